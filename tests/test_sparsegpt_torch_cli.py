"""SparseGPT through the front ends: ``aprender.torch.prune_(importance="sparsegpt")``,
``prune_sequential_``, shared Hessians from ``collect_calibration``, and ``aprender prune
--importance sparsegpt`` on a checkpoint — each giving exactly what ``sparsegpt()`` gives."""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from aprender.cli import main  # noqa: E402
from aprender.errors import CalibrationError, CalibrationRequiredError  # noqa: E402
from aprender.io import SafetensorsFile, write_safetensors  # noqa: E402
from aprender.pruning import CalibrationContext, sparsegpt  # noqa: E402
from aprender.torch import (collect_calibration, layer_blocks, prune_,  # noqa: E402
                            prune_sequential_, to_numpy_view)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Attention(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, -1)
        return x + self.o(a @ self.v(x))


class Model(torch.nn.Module):
    def __init__(self, d=32, n=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(Attention(d) for _ in range(n))
        self.head = torch.nn.Linear(d, 8)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def batches(dtype=torch.float32, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(32, generator=gen) * 3
    return [(torch.randn(4, 8, 32, generator=gen) * scale).to(dtype) for _ in range(n)]


def model_and_context(dtype="float32"):
    torch.manual_seed(0)
    model = Model().to(DTYPES[dtype])
    ctx = collect_calibration(model, batches(DTYPES[dtype]), hessian=True, progress=False)
    return model, ctx


def test_query_key_value_share_one_hessian():
    model, ctx = model_and_context()
    q, k, v, o = (ctx[f"layers.0.{n}"] for n in "qkvo")
    assert k.shares_hessian_with(q) and v.shares_hessian_with(q)
    assert not o.shares_hessian_with(q)
    # equal to collecting each layer on its own
    alone = collect_calibration(model, batches(), hessian=True, progress=False,
                                share_hessians=False)
    for n in "qkvo":
        a = alone[f"layers.0.{n}"]
        assert not a.shares_hessian_with(alone["layers.0.q"]) or n == "q"
        np.testing.assert_array_equal(ctx[f"layers.0.{n}"].hessian, a.hessian)
        assert ctx[f"layers.0.{n}"].count == a.count


def test_inputs_that_stop_being_shared_are_refused():
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x * 2)

    with pytest.raises(CalibrationError, match="'b' and 'a' read the same input tensor in "
                                               "their first batch but not the same inputs in "
                                               "batch 1"):
        collect_calibration(Flaky(), [torch.randn(2, 4), torch.randn(2, 4)], hessian=True,
                            progress=False)
    ctx = collect_calibration(Flaky(), [torch.randn(2, 4), torch.randn(2, 4)], hessian=True,
                              progress=False, share_hessians=False)
    assert not ctx["b"].shares_hessian_with(ctx["a"])


class _TwoLayers(torch.nn.Module):
    """Two 4 x 4 layers a and b, and a count of forward calls; subclasses say how x reaches
    them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.calls = 0


class _InPlace(_TwoLayers):  # the same object, new values: never shared
    def forward(self, x):
        h = self.a(x)
        x.mul_(3.0).add_(1.0)
        return h + self.b(x)


class _Twice(_TwoLayers):  # a reads x and y, b only y: not the same inputs
    def forward(self, x):
        y = x * 2
        return self.a(x) + self.a(y) + self.b(y)


class _Chunked(_TwoLayers):  # both read both chunks, in another order: shared
    def forward(self, x):
        p = list(x.chunk(2))
        ya = [self.a(t) for t in p]
        yb = [self.b(t) for t in reversed(p)]
        return torch.cat(ya) + torch.cat(yb[::-1])


class _FollowerFirst(_TwoLayers):  # b runs before a on the second batch
    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            return self.a(x) + self.b(x)
        return self.b(x) + self.a(x * 1.5)


class _LeaderOnly(_TwoLayers):  # b skips the second batch
    def forward(self, x):
        self.calls += 1
        return self.a(x) + (self.b(x) if self.calls == 1 else 0)


@pytest.mark.parametrize("cls,shared", [(_InPlace, None), (_Twice, "error"),
                                        (_Chunked, True), (_FollowerFirst, "error"),
                                        (_LeaderOnly, "error")])
def test_sharing_follows_the_inputs_each_layer_really_saw(cls, shared):
    data = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    torch.manual_seed(0)
    alone = collect_calibration(cls(), [d.clone() for d in data], hessian=True, progress=False,
                                share_hessians=False)
    torch.manual_seed(0)
    if shared == "error":
        with pytest.raises(CalibrationError, match="one Hessian cannot serve both"):
            collect_calibration(cls(), [d.clone() for d in data], hessian=True, progress=False)
        return
    ctx = collect_calibration(cls(), [d.clone() for d in data], hessian=True, progress=False)
    assert ctx["b"].shares_hessian_with(ctx["a"]) == bool(shared)
    for n in "ab":  # sharing or not, every layer ends with its own inputs' statistics
        np.testing.assert_allclose(ctx[n].hessian, alone[n].hessian, rtol=1e-6)
        np.testing.assert_array_equal(ctx[n].sum_squares, alone[n].sum_squares)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_equals_sparsegpt_per_layer(dtype, pattern):
    model, ctx = model_and_context(dtype)
    original = copy.deepcopy(model)
    sparsity = 0.5 if pattern == "unstructured" else None
    report = prune_(model, sparsity, pattern, importance="sparsegpt", calibration=ctx)
    assert {r["name"] for r in report} == {n + ".weight" for n, m in model.named_modules()
                                           if isinstance(m, torch.nn.Linear)}
    for name, mod in original.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        want, mask = sparsegpt(to_numpy_view(mod.weight), ctx[name], sparsity, pattern=pattern)
        got = to_numpy_view(dict(model.named_modules())[name].weight)
        gb = got.bits if hasattr(got, "bits") else got
        wb = want.bits if hasattr(want, "bits") else want
        assert np.array_equal(gb, wb), name
    with pytest.raises(CalibrationRequiredError, match="hessian=True"):
        prune_(copy.deepcopy(original), 0.5, importance="sparsegpt", calibration=None)


def test_prune_keep_mask_registers_the_mask_on_the_updated_weights():
    model, ctx = model_and_context()
    ref_model = copy.deepcopy(model)
    prune_(ref_model, 0.5, importance="sparsegpt", calibration=ctx)
    prune_(model, 0.5, importance="sparsegpt", calibration=ctx, keep_mask=True)
    x = batches(n=1, seed=9)[0]
    torch.testing.assert_close(model(x), ref_model(x), rtol=0, atol=0)
    assert hasattr(model.layers[0].q, "weight_mask")


def test_prune_sequential_prunes_every_block_with_pruned_inputs():
    model, _ = model_and_context()
    one_shot = copy.deepcopy(model)
    data = batches(n=2)
    ctx = collect_calibration(one_shot, data, hessian=True, progress=False)
    prune_(one_shot, 0.5, importance="sparsegpt", calibration=ctx)
    report = prune_sequential_(model, data, 0.5)
    assert [b for b, _ in layer_blocks(model)] == ["layers.0", "layers.1", "head"]
    assert len(report) == 9 and all(r["sparsity"] == 0.5 for r in report)
    # block 0 sees the same inputs either way; block 1 sees block 0's pruned output
    assert torch.equal(model.layers[0].q.weight, one_shot.layers[0].q.weight)
    assert not torch.equal(model.layers[1].q.weight, one_shot.layers[1].q.weight)
    with pytest.raises(Exception, match="re-iterable"):
        prune_sequential_(model, iter(data), 0.5)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

def checkpoint(tmp_path, dtype="bfloat16"):
    model, ctx = model_and_context(dtype)
    ctx.save(tmp_path / "calib.safetensors")
    state = {}
    for name, p in model.state_dict().items():
        v = to_numpy_view(p)
        state[name] = v if isinstance(v, np.ndarray) else v.bits.view(ml_dtypes.bfloat16)
    (tmp_path / "in").mkdir()
    write_safetensors(tmp_path / "in" / "model.safetensors", state)
    return model, ctx


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["unstructured", "per-row", "2:4"])
def test_cli_equals_the_api(tmp_path, dtype, pattern):
    model, _ = checkpoint(tmp_path, dtype)
    ctx = CalibrationContext.load(tmp_path / "calib.safetensors")  # float32 Hessians, as the CLI
    args = ["prune", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--importance",
            "sparsegpt", "--calibration", str(tmp_path / "calib.safetensors"), "--pattern",
            pattern, "--report", str(tmp_path / "r.json"), "--quiet"]
    if pattern != "2:4":
        args += ["--sparsity", "0.5"]
    assert main(args) == 0
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    inp = SafetensorsFile(tmp_path / "in" / "model.safetensors")
    report = json.loads((tmp_path / "r.json").read_text())
    pruned = {r["name"] for r in report["tensors"]}
    assert pruned == {f"layers.{i}.{n}.weight" for i in range(2) for n in "qkvo"}
    for info in inp.infos:
        if info.name not in pruned:
            assert out.words(info.name).tobytes() == inp.words(info.name).tobytes()
            continue
        want, mask = sparsegpt(inp.array(info.name), ctx[info.name[:-7]],
                               0.5 if pattern != "2:4" else None, pattern=pattern)
        wb = want.bits if hasattr(want, "bits") else want
        assert out.words(info.name).tobytes() == np.ascontiguousarray(wb).tobytes(), info.name
    assert report["importance"] == "sparsegpt"
    assert report["sparsegpt_workspace_bytes"] > 0


def test_cli_sparse24_bitmask_holds_the_updated_weights(tmp_path):
    from aprender import sparse24

    checkpoint(tmp_path, "float16")
    calib = tmp_path / "calib.safetensors"
    assert main(["prune", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--importance",
                 "sparsegpt", "--calibration", str(calib), "--pattern", "2:4", "--format",
                 "sparse-24-bitmask", "--quiet"]) == 0
    assert main(["prune", str(tmp_path / "in"), "-o", str(tmp_path / "dense"), "--importance",
                 "sparsegpt", "--calibration", str(calib), "--pattern", "2:4", "--quiet"]) == 0
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    dense = SafetensorsFile(tmp_path / "dense" / "model.safetensors")
    p = "layers.1.v"
    st = sparse24.Sparse24Tensor.from_tensors(
        {f"{p}.{n}": np.array(out.array(f"{p}.{n}")) for n in ("shape", "compressed", "bitmask")},
        p)
    np.testing.assert_array_equal(st.to_dense(), dense.array(f"{p}.weight"))


def test_cli_refuses_what_sparsegpt_cannot_do(tmp_path, capsys):
    model, ctx = checkpoint(tmp_path)
    base = ["prune", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--importance",
            "sparsegpt", "--sparsity", "0.5"]
    assert main(base) == 2
    assert "needs --calibration FILE (from 'aprender calibrate --hessian')" in \
        capsys.readouterr().err
    assert main(base + ["--calibration", str(tmp_path / "calib.safetensors"), "--scope",
                        "global"]) == 2
    assert "--scope layer" in capsys.readouterr().err
    no_h = CalibrationContext({n: ctx[n].copy() for n in ctx}, num_samples=1)
    for n in no_h:
        no_h[n]._h = None
    no_h.save(tmp_path / "wanda.safetensors")
    assert main(base + ["--calibration", str(tmp_path / "wanda.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "no Hessian for layer 'layers.0.q'" in err and "--hessian" in err
    assert not (tmp_path / "out").exists()


def test_prune_after_torch_pruning_keeps_the_old_zeros_pruned():
    from torch.nn.utils import prune as tprune

    model, ctx = model_and_context()
    q = model.layers[0].q
    tprune.l1_unstructured(q, "weight", amount=0.3)
    old = (q.weight_mask == 0).numpy().copy()
    effective = (q.weight_orig * q.weight_mask).detach().numpy().copy()
    prune_(model, 0.5, importance="sparsegpt", calibration=ctx, include=r"layers\.0\.q\.")
    want, mask = sparsegpt(effective, ctx["layers.0.q"], 0.5, must_prune=old)
    assert not mask.keep[old].any()
    np.testing.assert_array_equal((q.weight_mask != 0).numpy(), mask.keep)
    np.testing.assert_array_equal(q.weight.detach().numpy(), want)


def test_cli_factorises_a_shared_hessian_once(tmp_path, monkeypatch):
    from aprender.pruning import reconstruct

    checkpoint(tmp_path, "float32")
    calls = []
    real = reconstruct._factor

    def counted(h, *args):
        calls.append(h.shape)
        return real(h, *args)

    monkeypatch.setattr(reconstruct, "_factor", counted)
    args = ["prune", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--importance",
            "sparsegpt", "--calibration", str(tmp_path / "calib.safetensors"), "--sparsity",
            "0.5", "--quiet"]
    assert main(args) == 0
    # per block: q, k and v read one input (one Hessian), o its own: 2 factorisations, not 4
    assert len(calls) == 4
    ctx = CalibrationContext.load(tmp_path / "calib.safetensors")
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    inp = SafetensorsFile(tmp_path / "in" / "model.safetensors")
    monkeypatch.setattr(reconstruct, "_factor", real)
    for i in range(2):
        for n in "qkvo":
            name = f"layers.{i}.{n}.weight"
            want, _ = sparsegpt(inp.array(name), ctx[name[:-7]], 0.5)
            assert out.words(name).tobytes() == want.tobytes(), name


def test_a_factor_of_another_size_or_width_is_refused():
    from aprender.errors import InvalidArgumentError, InvalidDTypeError, ShapeMismatchError
    from aprender.pruning.reconstruct import hessian_factor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16))
    h = x.T @ x
    w = rng.standard_normal((8, 16)).astype(np.float32)
    f = hessian_factor(h)
    a, _ = sparsegpt(w, None, 0.5, factor=f)
    b, _ = sparsegpt(w, h, 0.5)
    assert a.tobytes() == b.tobytes()
    with pytest.raises(ShapeMismatchError):
        sparsegpt(w[:, :8], None, 0.5, factor=f)
    with pytest.raises(InvalidDTypeError):
        sparsegpt(w.astype(np.float64), None, 0.5, factor=f)
    with pytest.raises(InvalidArgumentError):
        sparsegpt(w, h, 0.5, factor=f.u)
