"""Output encodings of a pruned tensor streamed from a checkpoint: dense (zeros written in
place, chunk by chunk, input untouched; from a keep-mask, or for a layer-scope magnitude
selection straight from its threshold), compressed-tensors ``sparse-24-bitmask`` and aprender's
compact ``bitmask`` (see :mod:`aprender.io.formats`).  Pruned positions are +0.0 in every
encoding: zeroing clears every bit, and the compressed ones decode to zeros."""
import numpy as np

from .._kernels import apply as _apply
from .._kernels import select as _select
from .._validation import Bits16
from ..errors import LayoutError
from .safetensors import dtype_code

__all__ = ["CHUNK", "masked_chunks", "zeroed_chunks", "bitmask_tensors", "packed_tensors",
           "BITMASK_SUFFIXES"]

CHUNK = 1 << 22  # elements per chunk
BITMASK_SUFFIXES = (".shape", ".compressed", ".bitmask")


def _read_chunks(sf, t):
    """(first element, words) of the tensor's chunks, read (not mapped) into one reused buffer:
    each is overwritten by the next."""
    n = t.size
    buf = np.empty(min(CHUNK, n), np.dtype(f"u{t.itemsize}"))
    for a in range(0, n, CHUNK):
        chunk = buf[:min(n, a + CHUNK) - a]
        sf.read_into(t.name, a, chunk)
        yield a, chunk


def masked_chunks(sf, t, keep, nt):
    """The tensor's words with pruned positions zeroed, chunk by chunk; ``keep`` is the flat
    uint8 keep-mask."""
    for a, chunk in _read_chunks(sf, t):
        _apply.apply_mask(chunk, keep[a:a + chunk.shape[0]], nt)
        yield chunk


def zeroed_chunks(sf, t, thresh, r, nt, tally):
    """The tensor's words with a layer-scope magnitude selection applied without a mask: words
    whose magnitude key is below ``thresh`` zeroed, and the first ``r`` equal to it (flat
    order), chunk by chunk.  ``tally.kept`` receives the kept count and ``tally.r`` the ties left
    unassigned (0 when the words read are the ones selected on)."""
    tally.kept, tally.r = 0, r
    for _, chunk in _read_chunks(sf, t):
        zeroed, kept = _select.zero_pass(chunk, thresh, tally.r, nt)
        tally.r -= zeroed
        tally.kept += kept
        yield chunk


def _typed(words, code, shape):
    if code == "BF16":
        return Bits16(words.reshape(shape), "bfloat16")
    dt = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[code]
    return words.view(dt).reshape(shape)


def bitmask_names(name):
    """The three output names of tensor ``name`` (P.shape, P.compressed, P.bitmask; P: the
    name without ".weight")."""
    p = name[:-len(".weight")] if name.endswith(".weight") else name
    return [p + s for s in BITMASK_SUFFIXES]


def bitmask_tensors(words, keep, t, nt):
    """[(name, dtype code, shape, C-contiguous array)] of the sparse-24-bitmask encoding, straight
    from the mapped weights and the mask.  Raises LayoutError naming the tensor."""
    from .. import sparse24

    try:
        st = sparse24.compress(_typed(words, t.dtype, t.shape), layout="bitmask",
                               mask=keep.view(np.bool_).reshape(t.shape), n_threads=nt)
        out = st.to_tensors(t.name)
    except LayoutError as exc:
        raise LayoutError(f"tensor {t.name!r}: cannot write the sparse-24-bitmask format "
                          f"({exc})") from None
    res = []
    for name, a in out.items():
        code = dtype_code(a)
        if t.dtype == "BF16" and name.endswith(".compressed"):
            code = "BF16"
            a = a.bits if isinstance(a, Bits16) else a
        a = np.ascontiguousarray(a)
        res.append((name, code, a.shape, a))
    return res


def packed_tensors(words, keep, t):
    """[(name, dtype code, shape, array)] of aprender's lossless ``bitmask`` format for tensor
    ``t`` (any pattern): ``W.values`` (kept values, 1-D, the tensor's dtype), ``W.mask``
    (packed keep bits, U8) and ``W.shape`` (I64); W is the tensor's full name."""
    from .formats import BITMASK_PARTS, pack_bitmask

    values, bits = pack_bitmask(words, keep)
    shape = np.asarray(t.shape, np.int64)
    v, m, s = (t.name + x for x in BITMASK_PARTS)
    return [(v, t.dtype, values.shape, values), (m, "U8", bits.shape, bits),
            (s, "I64", shape.shape, shape)]
