"""`aprender prune --importance wanda` streams Wanda scores chunk by chunk from the weights and
the calibration statistics, and gives exactly what `aprender.torch.prune_` gives on the same
model with the same calibration."""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from aprender.cli import main  # noqa: E402
from aprender.io import SafetensorsFile, write_safetensors  # noqa: E402
from aprender.pruning import CalibrationContext, owl_sparsities, WandaImportance  # noqa: E402
from aprender.pruning.streaming import GlobalPlan, wanda_units  # noqa: E402
from aprender.torch import collect_calibration, prune_, to_numpy_view  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=False)
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        x = x + self.q(x)
        return x + self.down(torch.relu(self.up(x)))


class Model(torch.nn.Module):
    def __init__(self, d=32, h=48, n=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(d, h) for _ in range(n))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def setup(tmp_path, dtype="float32", seed=0):
    torch.manual_seed(seed)
    model = Model().to(DTYPES[dtype])
    gen = torch.Generator().manual_seed(seed + 1)
    # correlated, uneven activations: some input features matter much more than others
    scale = torch.rand(32, generator=gen) * 4
    batches = [(torch.randn(4, 6, 32, generator=gen) * scale).to(DTYPES[dtype])
               for _ in range(3)]
    ctx = collect_calibration(model, batches, progress=False)
    ctx.save(tmp_path / "calib.safetensors")
    state = {}
    for name, p in model.state_dict().items():
        v = to_numpy_view(p)
        state[name] = v if isinstance(v, np.ndarray) else v.bits.view(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "model.safetensors", state)
    return model, ctx


def weights_of(path):
    f = SafetensorsFile(path)
    return {t.name: np.array(f.words(t.name)).reshape(t.shape) for t in f}


def torch_weights(model):
    out = {}
    for name, p in model.state_dict().items():
        v = to_numpy_view(p)
        out[name] = np.array(v.bits if hasattr(v, "bits") else v).view(
            {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[p.element_size()])
    return out


CASES = [("per-row", 0.5, "layer"), ("per-row", 0.3, "layer"), ("unstructured", 0.6, "layer"),
         ("2:4", None, "layer"), ("unstructured", 0.5, "global")]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern,sparsity,scope", CASES)
def test_cli_equals_torch_prune(tmp_path, capsys, dtype, pattern, sparsity, scope):
    model, ctx = setup(tmp_path, dtype)
    args = ["prune", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "out.safetensors"),
            "--importance", "wanda", "--calibration", str(tmp_path / "calib.safetensors"),
            "--pattern", pattern, "--scope", scope, "--quiet", "--include", r"\.weight$",
            "--exclude", "bias"]
    if sparsity is not None:
        args += ["--sparsity", str(sparsity)]
    assert main(args) == 0, capsys.readouterr().err
    ref = copy.deepcopy(model)
    prune_(ref, sparsity=sparsity, pattern=pattern, scope=scope, importance="wanda",
           calibration=ctx)
    got = weights_of(tmp_path / "out.safetensors")
    want = torch_weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name].reshape(-1), want[name].reshape(-1), err_msg=name)


def test_owl_allocation_equals_the_api(tmp_path, capsys):
    model, ctx = setup(tmp_path, "float32", seed=3)
    rep = tmp_path / "r.json"
    assert main(["prune", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "o.safetensors"),
                 "--importance", "wanda", "--calibration", str(tmp_path / "calib.safetensors"),
                 "--pattern", "unstructured", "--sparsity", "0.5", "--allocation", "owl",
                 "--owl-lambda", "0.1", "--owl-m", "3", "--include", r"\.weight$",
                 "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    scores = {n: WandaImportance(n).compute(model.get_submodule(n).weight.detach(), ctx)
              for n in names}
    alloc = owl_sparsities(scores, 0.5, m=3, lam=0.1).as_dict()
    assert report["allocation"]["method"] == "owl"
    for n in names:
        assert report["allocation"]["sparsity"][n + ".weight"] == pytest.approx(alloc[n], abs=0)
    # exact to the element over the pruned tensors, and not uniform
    assert report["totals"]["pruned"] == report["totals"]["selected_elements"] // 2
    assert len({round(r["sparsity"], 6) for r in report["tensors"]}) > 1
    ref = copy.deepcopy(model)
    prune_(ref, sparsity=alloc, pattern="unstructured", importance="wanda", calibration=ctx)
    got, want = weights_of(tmp_path / "o.safetensors"), torch_weights(ref)
    for name in want:
        np.testing.assert_array_equal(got[name].reshape(-1), want[name].reshape(-1), err_msg=name)


def test_chunking_does_not_change_the_selection(tmp_path):
    """Scores computed in row chunks of any size select the same exact mask."""
    model, ctx = setup(tmp_path, "bfloat16")
    f = SafetensorsFile(tmp_path / "model.safetensors")
    t = f.tensors["layers.0.up.weight"]
    from aprender.pruning.importance import wanda_scale

    scale = wanda_scale(ctx.require_stats("layers.0.up"))
    keeps = []
    for chunk in (32, 96, 1 << 22):
        units = wanda_units(f, t, scale, "up", 1, chunk=chunk)
        assert len(units) == (1 if chunk > t.size else -(-t.shape[0] // (chunk // t.shape[1])))
        plan = GlobalPlan(units, 0.55, None, 2, [list(range(len(units)))])
        keeps.append(plan.group_keep(0, np.empty(t.size, np.uint8)).copy())
    assert all(np.array_equal(keeps[0], k) for k in keeps[1:])
    assert int((keeps[0] == 0).sum()) == round(0.55 * t.size)


def test_wanda_errors(tmp_path, capsys):
    model, ctx = setup(tmp_path)
    src, calib = str(tmp_path / "model.safetensors"), str(tmp_path / "calib.safetensors")
    out = str(tmp_path / "o.safetensors")
    assert main(["prune", src, "-o", out, "--importance", "wanda", "--sparsity", "0.5"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert main(["prune", src, "-o", out, "--calibration", calib, "--sparsity", "0.5"]) == 2
    capsys.readouterr()
    assert main(["prune", src, "-o", calib, "--importance", "wanda", "--calibration", calib,
                 "--sparsity", "0.5", "--force"]) == 2
    capsys.readouterr()
    # statistics for only some layers: the first selected tensor without them is named
    part = CalibrationContext()
    part.add_layer_stats("layers.0.q", ctx.require_stats("layers.0.q"))
    part.save(tmp_path / "part.safetensors")
    assert main(["prune", src, "-o", out, "--importance", "wanda", "--calibration",
                 str(tmp_path / "part.safetensors"), "--sparsity", "0.5",
                 "--include", r"\.weight$"]) == 1
    assert "layers.0.up" in capsys.readouterr().err
    # statistics of the wrong width
    wrong = CalibrationContext()
    for n in ctx.layer_names:
        wrong.add_layer_stats(n, ctx.require_stats("layers.0.up" if n.endswith("down")
                                                   else n))
    wrong.save(tmp_path / "wrong.safetensors")
    assert main(["prune", src, "-o", out, "--importance", "wanda", "--calibration",
                 str(tmp_path / "wrong.safetensors"), "--sparsity", "0.5",
                 "--include", r"\.weight$"]) == 1
    err = capsys.readouterr().err
    assert "layers.0.down" in err and "48" in err and "32" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors",
                                                          "model.safetensors",
                                                          "part.safetensors",
                                                          "wrong.safetensors"]


@pytest.mark.parametrize("cuts", [[], [1], [65535, 65537], [1000, 70000, 200001, 200002]])
def test_streamed_outlier_ratio_is_bit_identical(cuts):
    from aprender.pruning.owl import owl_outlier_ratio, streamed_outlier_ratio

    rng = np.random.default_rng(5)
    scores = (rng.standard_exponential(300_000) ** 3).astype(np.float32)
    pieces = np.split(scores, cuts)
    for m in (2.0, 5.0):
        assert streamed_outlier_ratio(lambda: iter(pieces), m) == owl_outlier_ratio(scores, m)
