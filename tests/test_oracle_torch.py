"""External oracle: masks equal PyTorch's pruning on tie-free data (a skip fails CI)."""
import zlib

import numpy as np
import pytest

from aprender.pruning import (generate_global_mask, generate_unstructured_mask, magnitude_mask)

torch = pytest.importorskip("torch")
prune = pytest.importorskip("torch.nn.utils.prune")

pytestmark = pytest.mark.oracle


def tie_free(shape, dtype, seed):
    """Random weights with distinct magnitudes in the given torch dtype."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype in (torch.float16, torch.bfloat16):
        # distinct representable magnitudes: take distinct bit patterns of positive normals
        bits = rng.choice(np.arange(0x0400 if dtype == torch.float16 else 0x0080, 0x3C00,
                                    dtype=np.int32), n, replace=False)
        signs = rng.integers(0, 2, n) << 15
        t = torch.from_numpy(((bits | signs).astype(np.uint16)).view(np.int16)).view(dtype)
        return t.reshape(shape)
    mags = (rng.permutation(n) + 1.0) / n  # distinct, exact in float32 for n < 2**24
    t = torch.from_numpy(mags * rng.choice([-1.0, 1.0], n)).to(dtype).reshape(shape)
    assert torch.unique(t.abs()).numel() == n
    return t


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,amount", [((64, 96), 0.5), ((33, 47), 0.3), ((96, 120), 0.7),
                                          ((1000,), 0.25), ((7, 9), 0.6)])
def test_unstructured_equals_l1_unstructured(dtype, shape, amount):
    tdtype = getattr(torch, dtype)
    t = tie_free(shape, tdtype, seed=zlib.crc32(repr((dtype, shape)).encode()))
    # torch rounds halves to even where aprender rounds them down: the cases avoid halves
    assert (amount * t.numel()) % 1 != 0.5
    module = torch.nn.Linear(1, 1)
    module.weight = torch.nn.Parameter(t.clone())
    prune.l1_unstructured(module, "weight", amount=amount)
    expected = module.weight_mask.to(torch.bool).numpy()
    w = to_numpy(t)
    np.testing.assert_array_equal(np.asarray(magnitude_mask(w, amount)), expected)
    scores = np.abs(w)
    np.testing.assert_array_equal(np.asarray(generate_unstructured_mask(scores, amount)), expected)


def test_global_equals_global_unstructured():
    layers = [torch.nn.Linear(48, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)]
    rng = np.random.default_rng(0)
    vals = rng.permutation(sum(layer.weight.numel() for layer in layers)) + 1.0
    start = 0
    for layer in layers:
        n = layer.weight.numel()
        sign = rng.choice([-1.0, 1.0], n)
        layer.weight.data = torch.from_numpy((vals[start:start + n] * sign / 1e4)
                                             .reshape(layer.weight.shape).astype(np.float32))
        start += n
    weights = [layer.weight.detach().numpy().copy() for layer in layers]
    prune.global_unstructured([(layer, "weight") for layer in layers],
                              pruning_method=prune.L1Unstructured, amount=0.6)
    masks = generate_global_mask([np.abs(w) for w in weights], 0.6)
    for layer, m in zip(layers, masks):
        np.testing.assert_array_equal(np.asarray(m), layer.weight_mask.to(torch.bool).numpy())


def test_per_row_equals_wanda_stable_sort():
    """Wanda prunes per output row with a stable sort: lowest index first among ties."""
    rng = np.random.default_rng(1)
    w = rng.integers(-4, 5, (37, 64)).astype(np.float32)  # heavy ties on purpose
    metric = torch.from_numpy(np.abs(w))
    k = int(64 * 0.5)
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
    expected = torch.ones_like(metric, dtype=torch.bool).scatter_(1, idx, False).numpy()
    np.testing.assert_array_equal(np.asarray(magnitude_mask(w, 0.5, per_row=True)), expected)
