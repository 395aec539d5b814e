"""aprender.torch: zero-copy views and prune_, checked against torch.nn.utils.prune."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.utils.prune as tprune  # noqa: E402

import aprender  # noqa: E402
from aprender import Bits16  # noqa: E402
from aprender._validation import prune_count  # noqa: E402
from aprender.pruning import (InvalidArgumentError, InvalidPatternError,  # noqa: E402
                              InvalidSparsityError, SparsityPattern)
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
    report = prune_(m, sparsity=0.25, pattern="per-row", include=[r"^0\.", r"^3\."])
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
    with pytest.raises(InvalidSparsityError, match="needs a sparsity"):
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


def test_row_is_a_deprecated_alias_of_per_row():
    """prune_(pattern="row") meant per-row unstructured before SparsityPattern.parse became the
    one parser (where "row" prunes whole rows): it still does here, with a warning."""
    a, b = make_model(), make_model()
    with pytest.warns(DeprecationWarning, match="per-row"):
        ra = prune_(a, sparsity=0.25, pattern="row")
    rb = prune_(b, sparsity=0.25, pattern=SparsityPattern.per_row())
    assert ra == rb
    for i in (1, 3):
        assert torch.equal(a[i].weight, b[i].weight)
    with pytest.raises(InvalidPatternError, match="block 2x2"):
        prune_(make_model(), sparsity=0.5, pattern="block:2x2")
    with pytest.raises(InvalidPatternError, match="column"):
        prune_(make_model(), sparsity=0.5, pattern=SparsityPattern.columns())


# ----------------------------------------------------------------------------------------------
# modules already pruned by torch.nn.utils.prune: the forward pass must use the reported mask
# ----------------------------------------------------------------------------------------------

def _forward_weight(lin):
    """The weight a Linear's forward pass really uses, read back through the forward pass."""
    with torch.no_grad():
        eye = torch.eye(lin.in_features, dtype=lin.weight.dtype)
        out = lin(eye) - (lin.bias if lin.bias is not None else 0)
    return out.t()


@pytest.mark.oracle
@pytest.mark.parametrize("keep_mask", [False, True])
@pytest.mark.parametrize("before, after", [(0.1, 0.5), (0.1, 0.1), (0.6, 0.3)])
def test_prune_reparametrised_module_uses_the_reported_mask(keep_mask, before, after):
    lin = make_model()[1]
    tprune.l1_unstructured(lin, "weight", amount=before)
    old_mask = lin.weight_mask.clone()
    effective = (lin.weight_orig * lin.weight_mask).detach().clone()
    report = prune_(lin, sparsity=after, keep_mask=keep_mask)
    # the mask aprender selects on the effective weight, combined with the existing one
    new = torch.from_numpy(aprender.magnitude_mask(effective, after).keep.copy())
    expected = new & old_mask.bool()
    x = torch.randn(5, lin.in_features)
    want = torch.nn.functional.linear(x, effective * expected, lin.bias)
    torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    real = float((_forward_weight(lin) == 0).float().mean())
    assert report[0]["sparsity"] == pytest.approx(real)
    n = lin.weight.numel()
    assert report[0]["sparsity"] == max(prune_count(before, n), prune_count(after, n)) / n
    assert report[0]["kept"] == int(expected.sum())
    # the module stays a torch-pruned module whose mask tells the truth
    assert torch.equal(lin.weight_mask.bool(), expected)
    if keep_mask:
        torch.testing.assert_close(lin.weight_orig * old_mask, effective)
    else:
        assert bool((lin.weight_orig[~expected] == 0).all())
    tprune.remove(lin, "weight")
    assert float((lin.weight == 0).float().mean()) == pytest.approx(real)


@pytest.mark.oracle
def test_prune_reparametrised_global_counts_the_forward_weights():
    model = make_model()
    tprune.l1_unstructured(model[1], "weight", amount=0.2)
    report = prune_(model, sparsity=0.5, scope="global")
    pruned = sum(int((_forward_weight(model[i]) == 0).sum()) for i in (1, 3))
    total = sum(r["total"] for r in report)
    assert pruned == sum(r["total"] - r["kept"] for r in report) == prune_count(0.5, total)


def test_prune_refuses_weights_it_cannot_change():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    lin = torch.nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Double())
    with pytest.raises(InvalidArgumentError, match=r"^weight is computed by a torch.*parametriz"):
        prune_(lin, sparsity=0.5)
    with warnings.catch_warnings():  # the hook-based weight_norm is deprecated, still in use
        warnings.simplefilter("ignore")
        normed = torch.nn.utils.weight_norm(torch.nn.Linear(4, 4))
    with pytest.raises(InvalidArgumentError, match="not a parameter or buffer"):
        prune_(normed, sparsity=0.5)
    lazy = torch.nn.LazyLinear(4)
    with pytest.raises(InvalidArgumentError, match="not initialised"):
        prune_(lazy, sparsity=0.5)


# ----------------------------------------------------------------------------------------------
# tied (shared) weights are selected and counted once
# ----------------------------------------------------------------------------------------------

def _tied_model():
    model = make_model()
    a, b = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        a.weight.copy_(tie_free((16, 16), seed=7))
    b.weight = a.weight  # tied: one Parameter, two modules
    return torch.nn.Sequential(model[1], a, b, model[3])


@pytest.mark.oracle
def test_global_scope_counts_tied_weights_once():
    ours, ref = _tied_model(), _tied_model()
    report = prune_(ours, sparsity=0.5, scope="global")
    assert [r["name"] for r in report] == ["0.weight", "1.weight", "3.weight"]
    assert [r["shared_with"] for r in report] == [[], ["2.weight"], []]
    unique = [ours[0].weight, ours[1].weight, ours[3].weight]
    total = sum(w.numel() for w in unique)
    pruned = sum(int((w == 0).sum()) for w in unique)
    assert pruned == prune_count(0.5, total) == sum(r["total"] - r["kept"] for r in report)
    assert pruned / total == 0.5
    # torch's global_unstructured over the distinct parameters agrees
    tprune.global_unstructured([(ref[0], "weight"), (ref[1], "weight"), (ref[3], "weight")],
                               pruning_method=tprune.L1Unstructured, amount=0.5)
    for i in (0, 1, 3):
        np.testing.assert_array_equal((ours[i].weight != 0).numpy(),
                                      ref[i].weight_mask.bool().numpy())
    assert ours[2].weight is ours[1].weight


@pytest.mark.parametrize("keep_mask", [False, True])
def test_layer_scope_prunes_tied_weights_once_for_every_module(keep_mask):
    model = _tied_model()
    report = prune_(model, sparsity=0.25, keep_mask=keep_mask)
    assert [r["name"] for r in report] == ["0.weight", "1.weight", "3.weight"]
    w1, w2 = _forward_weight(model[1]), _forward_weight(model[2])
    assert torch.equal(w1, w2)
    assert int((w1 == 0).sum()) == prune_count(0.25, 256) == 256 - report[1]["kept"]


def test_prune_refuses_partially_overlapping_weights():
    a, b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    b.weight = torch.nn.Parameter(a.weight.detach().t())  # same memory, transposed
    with pytest.raises(InvalidArgumentError, match=r"0\.weight and 1\.weight share memory"):
        prune_(torch.nn.Sequential(a, b), sparsity=0.5, scope="global")
