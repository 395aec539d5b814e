"""aprender.torch: zero-copy views and prune_, checked against torch.nn.utils.prune."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.utils.prune as tprune  # noqa: E402

import aprender  # noqa: E402
from aprender import Bits16  # noqa: E402
from aprender._validation import prune_count  # noqa: E402
from aprender.pruning import InvalidArgumentError, InvalidPatternError  # noqa: E402
from aprender.torch import DeviceError, prune_, to_numpy_view  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tie_free(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    if dtype == torch.float32:
        vals = (torch.randperm(n, generator=g).double() + 1) / n
        vals = vals.float()
    else:  # distinct 16-bit magnitudes
        bits = torch.randperm(n, generator=g).to(torch.int32) + 0x3000
        vals = bits.to(torch.int16).view(dtype)
    sign = torch.randint(0, 2, (n,), generator=g).to(vals.dtype) * 2 - 1
    return (vals * sign).reshape(shape)


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16),
                            torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.LayerNorm(12))
    with torch.no_grad():
        for i, p in enumerate([m[0].weight, m[1].weight, m[3].weight]):
            p.copy_(tie_free(p.shape, dtype=torch.float32, seed=seed + i))
    return m.to(dtype)


def test_to_numpy_view_zero_copy():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    v = to_numpy_view(t)
    assert isinstance(v, np.ndarray) and v.shape == (3, 4)
    v[0, 1] = -5
    assert t[0, 1].item() == -5
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float16))
    v = to_numpy_view(p)
    assert v.dtype == np.float16
    v[1, 2] = 0
    assert p[1, 2].item() == 0
    b = torch.randn(4, 6).to(torch.bfloat16)
    bv = to_numpy_view(b)
    assert isinstance(bv, Bits16) and bv.format == "bfloat16"
    np.testing.assert_array_equal(bv.bits, b.view(torch.int16).numpy().view(np.uint16))
    bv.bits[0, 0] = 0
    assert b[0, 0].item() == 0
    tt = t.t()  # non-contiguous: still a view
    tv = to_numpy_view(tt)
    assert tv.shape == (4, 3)
    tv[2, 1] = 9
    assert t[1, 2].item() == 9


def test_to_numpy_view_rejects_non_cpu():
    with pytest.raises(DeviceError, match="cpu"):
        to_numpy_view(torch.empty(3, device="meta"))
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        with pytest.raises(DeviceError):
            to_numpy_view(torch.ones(3, device="cuda"))
    with pytest.raises(TypeError):
        to_numpy_view(np.ones(3))


def test_entry_points_accept_tensors():
    w = tie_free((8, 16), torch.bfloat16)
    m = aprender.magnitude_mask(w, 0.5)
    ref = aprender.magnitude_mask(Bits16(w.view(torch.int16).numpy().view(np.uint16)), 0.5)
    np.testing.assert_array_equal(m.keep, ref.keep)
    m.apply(w)
    assert int((w == 0).sum()) == 64


@pytest.mark.oracle
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_prune_layer_matches_l1_unstructured(sparsity):
    ours, ref = make_model(), make_model()
    report = prune_(ours, sparsity=sparsity)
    assert [r["name"] for r in report] == ["1.weight", "3.weight"]
    for i in (1, 3):
        tprune.l1_unstructured(ref[i], "weight", amount=sparsity)
        np.testing.assert_array_equal((ours[i].weight != 0).numpy(),
                                      ref[i].weight_mask.bool().numpy())
        torch.testing.assert_close(ours[i].weight, ref[i].weight)
    assert all(r["kept"] == r["total"] - prune_count(sparsity, r["total"]) for r in report)
    # embedding untouched
    torch.testing.assert_close(ours[0].weight, make_model()[0].weight)


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prune_global_matches_global_unstructured(dtype):
    ours, ref = make_model(dtype), make_model(dtype)
    report = prune_(ours, sparsity=0.6, scope="global", n_threads=2)
    tprune.global_unstructured([(ref[1], "weight"), (ref[3], "weight")],
                               pruning_method=tprune.L1Unstructured, amount=0.6)
    for i in (1, 3):
        np.testing.assert_array_equal((ours[i].weight != 0).numpy(),
                                      ref[i].weight_mask.bool().numpy())
    total = sum(r["total"] for r in report)
    assert sum(r["total"] - r["kept"] for r in report) == prune_count(0.6, total)


@pytest.mark.oracle
def test_keep_mask_registers_torch_mask():
    ours, ref = make_model(), make_model()
    before = ours[1].weight.detach().clone()
    prune_(ours, sparsity=0.4, keep_mask=True)
    for i in (1, 3):
        tprune.l1_unstructured(ref[i], "weight", amount=0.4)
        assert hasattr(ours[i], "weight_orig") and hasattr(ours[i], "weight_mask")
        torch.testing.assert_close(ours[i].weight_mask, ref[i].weight_mask)
        torch.testing.assert_close(ours[i].weight, ref[i].weight)
    torch.testing.assert_close(ours[1].weight_orig, before)


def test_prune_nm_row_include():
    m = make_model(torch.float16)
    report = prune_(m, pattern="2:4")
    for i in (1, 3):
        g = m[i].weight.reshape(-1, 4)
        assert ((g != 0).sum(dim=1) == 2).all()
    assert all(r["sparsity"] == 0.5 and r["dtype"] == "float16" for r in report)
    m = make_model()
    report = prune_(m, sparsity=0.25, pattern="row", include=[r"^0\.", r"^3\."])
    assert [r["name"] for r in report] == ["0.weight", "3.weight"]
    for i in (0, 3):
        w = m[i].weight
        assert ((w == 0).sum(dim=1) == prune_count(0.25, w.shape[1])).all()
    assert (m[1].weight != 0).all()


def test_prune_errors():
    m = make_model()
    with pytest.raises(InvalidPatternError):
        prune_(m, sparsity=0.5, pattern="5:4")
    with pytest.raises(InvalidArgumentError):
        prune_(m, pattern="2:4", scope="global")
    with pytest.raises(InvalidArgumentError):
        prune_(m, sparsity=0.5, include="nothing-matches")
    with pytest.raises(InvalidArgumentError):
        prune_(m)
    with pytest.raises(ValueError):
        prune_(m, sparsity=1.5)
    m[1].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1.weight"):
        prune_(m, sparsity=0.5)


@pytest.mark.oracle
def test_checkpoint_cli_matches_torch_global(tmp_path):
    """A bfloat16 checkpoint saved by torch, pruned by the CLI (global), read back with
    safetensors.torch: the masks equal torch's global_unstructured on the same tensors."""
    st_torch = pytest.importorskip("safetensors.torch")
    model = make_model(torch.bfloat16)
    sd = {"embed.weight": model[0].weight.detach().clone(),
          "layers.0.proj.weight": model[1].weight.detach().clone(),
          "layers.0.proj.bias": model[1].bias.detach().clone(),
          "layers.1.proj.weight": model[3].weight.detach().clone(),
          "norm.weight": model[4].weight.detach().clone()}
    src = tmp_path / "m.safetensors"
    st_torch.save_file(sd, str(src))
    out = tmp_path / "o.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "aprender", "prune", str(src), "-o", str(out),
                    "--sparsity", "0.5", "--scope", "global", "--quiet"], check=True, env=env,
                   cwd=ROOT)
    res = st_torch.load_file(str(out))
    from aprender.io import SafetensorsFile

    order = [t.name for t in SafetensorsFile(src) if t.name.endswith("proj.weight")]
    mods = {n: torch.nn.Linear(1, 1, bias=False) for n in order}
    for n, mod in mods.items():
        mod.weight = torch.nn.Parameter(sd[n].float())
    tprune.global_unstructured([(mods[n], "weight") for n in order],
                               pruning_method=tprune.L1Unstructured, amount=0.5)
    for n in order:
        assert res[n].dtype == torch.bfloat16
        np.testing.assert_array_equal((res[n] != 0).numpy(), mods[n].weight_mask.bool().numpy())
    for n in sd:
        if n not in order:
            assert torch.equal(res[n], sd[n])


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_global_scope_refuses_nan_even_when_nothing_is_selected(sparsity):
    """sparsity 0 or 1 needs no threshold, but NaN weights still raise (found in review)."""
    from aprender.pruning import NumericalInstabilityError
    from aprender.torch import prune_

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalInstabilityError, match=r"\(0, 0\)"):
        prune_(model, sparsity=sparsity, scope="global")
