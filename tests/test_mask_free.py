"""The dense write of a layer-scope unstructured magnitude selection without a mask: the worker
finds the exact threshold (find_threshold, nothing written) and the writer zeroes words below
it, and the first ties in flat order, chunk by chunk (select.zero_pass).  Judged against the
reference mask and against the mask path, byte for byte."""
import numpy as np
import pytest

import aprender._reference as ref
import aprender.checkpoints as ckpts
import aprender.io.export as export
from aprender._kernels import select
from aprender._validation import prune_count
from aprender.checkpoints import prune_checkpoint
from aprender.errors import CheckpointError
from aprender.pruning import selection

ml_dtypes = pytest.importorskip("ml_dtypes")
st_numpy = pytest.importorskip("safetensors.numpy")

FMTS = {"f16": (np.float16, np.uint16, 0x7C00), "bf16": (ml_dtypes.bfloat16, np.uint16, 0x7F80),
        "f32": (np.float32, np.uint32, 0), "f64": (np.float64, np.uint64, 0)}


def _values(n, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 3
    if ties:  # a few distinct magnitudes, both signs, zeros of both signs
        x = rng.choice(np.array([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e-40]), size=n)
    x = x.astype(dtype)
    x[::17] = -0.0
    return x


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("ties", [False, True], ids=["spread", "ties"])
def test_zero_pass_streamed_equals_the_reference_mask(fmt, ties):
    dtype, wdt, inf16 = FMTS[fmt]
    rng = np.random.default_rng(7)
    for n in (300, 70_001, 200_003):
        x = _values(n, dtype, n, ties)
        words = x.view(wdt)
        kern = words if wdt == np.uint16 else x
        for sparsity in (0.1, 0.5, 0.93):
            k = prune_count(sparsity, n)
            thresh, below, bad, _ = selection.find_threshold([kern], [n], k, 1, inf16, 2)
            assert bad == 0
            keep = ref.unstructured_mask(x, sparsity, magnitude=True).reshape(-1)
            want = np.where(keep, words, wdt(0))
            got = words.copy()
            r, kept, a = k - below, 0, 0
            while a < n:  # chunks of uneven sizes, the ties carried from one to the next
                b = min(n, a + int(rng.integers(1, n // 3 + 2)))
                z, kp = select.zero_pass(got[a:b], thresh, r, int(rng.integers(1, 4)))
                r -= z
                kept += kp
                a = b
            assert r == 0 and kept == n - k
            np.testing.assert_array_equal(got, want)  # pruned words are +0.0: every bit clear


def _checkpoint(path, seed=3):
    rng = np.random.default_rng(seed)
    coarse = (rng.standard_normal((96, 700)) * 2).astype(ml_dtypes.bfloat16)  # heavy ties
    st_numpy.save_file({
        "model.layers.0.mlp.up_proj.weight": coarse,
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 300)).astype(np.float32),
        "model.layers.1.mlp.up_proj.weight": rng.standard_normal((80, 128)).astype(np.float16),
        "model.layers.1.mlp.down_proj.weight": rng.standard_normal((16, 48)).astype(np.float64),
        "model.norm.weight": np.ones(300, np.float32),
    }, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_checkpoint_mask_free_equals_the_mask_path(tmp_path, monkeypatch, sparsity):
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    monkeypatch.setattr(export, "CHUNK", 4099)  # many chunks per tensor, ties across them
    calls = []
    real = ckpts.CheckpointPruner._write_thresholded

    def spy(self, *a, **kw):
        calls.append(a[3].name)
        return real(self, *a, **kw)
    monkeypatch.setattr(ckpts.CheckpointPruner, "_write_thresholded", spy)
    free = prune_checkpoint(src, tmp_path / "free.safetensors", sparsity=sparsity)
    assert len(calls) == 4  # every selected tensor took the mask-free write
    monkeypatch.setattr(ckpts.CheckpointPruner, "_threshold", lambda self, shard, t, nt: None)
    masked = prune_checkpoint(src, tmp_path / "mask.safetensors", sparsity=sparsity)
    assert len(calls) == 4
    assert (tmp_path / "free.safetensors").read_bytes() == \
        (tmp_path / "mask.safetensors").read_bytes()
    assert [(r["name"], r["kept"]) for r in free["tensors"]] == \
        [(r["name"], r["kept"]) for r in masked["tensors"]]


def test_checkpoint_mask_free_refuses_a_count_that_does_not_add_up(tmp_path, monkeypatch):
    # the kept count of the words written must be the selection's: a threshold that does not
    # belong to the words (here: one tie too many) fails the tensor, and no output is left
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    real = ckpts.find_threshold

    def off_by_one(*a, **kw):
        thresh, below, bad, how = real(*a, **kw)
        return thresh, below - 1, bad, how
    monkeypatch.setattr(ckpts, "find_threshold", off_by_one)
    with pytest.raises(CheckpointError, match="changed while it was read"):
        prune_checkpoint(src, tmp_path / "out.safetensors", sparsity=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
