"""Compressed checkpoint encodings read back as dense tensors.

A shard's tensors are grouped into *logical* tensors (what a model loads):

* a plain tensor is itself;
* ``P.shape`` + ``P.compressed`` + ``P.bitmask`` (compressed-tensors ``sparse-24-bitmask``,
  written by ``aprender prune --format sparse-24-bitmask`` and by other tools) is the tensor
  ``P.weight``;
* in a shard whose ``aprender`` metadata says ``"format": "bitmask"``, ``W.values`` +
  ``W.mask`` + ``W.shape`` is the tensor ``W`` (aprender's compact lossless format):

  ========== ========== ========================================================================
  tensor     dtype      content
  ========== ========== ========================================================================
  W.values   W's dtype  the kept values, 1-D, in C order of the dense tensor
  W.mask     U8         the keep-mask, 1-D, packed 8 elements a byte, first element in the
                        lowest bit (``numpy.packbits(keep, bitorder="little")``); unused bits 0
  W.shape    I64        the dense shape, 1-D
  ========== ========== ========================================================================

Every group is validated as strictly as a header: dtypes, shapes, the number of set bits against
the number of values, padding bits; a group that does not fit is a :class:`CompressedFormatError`
naming the file and tensor.  Pruned positions always decode as +0.0.
"""
import math
import os

import numpy as np

from .._validation import Bits16, short_repr
from ..errors import CheckpointError, CompressedFormatError
from .files import display
from .safetensors import DTYPE_SIZES, MAX_DIMS, TensorShape, shape_too_large

__all__ = ["Logical", "logical_tensors", "checkpoint_layout", "decode", "load_dense",
           "dense_tensors", "pack_bitmask", "BITMASK_PARTS", "SPARSE24_PARTS", "shard_format",
           "FORMATS"]

FORMATS = ("dense", "sparse-24-bitmask", "bitmask")

# A ``bitmask`` output folder keeps the input's config.json under this name instead: with no
# config.json, transformers, sentence-transformers and vLLM refuse the folder rather than load it
# with random weights where the compressed tensors are; ``aprender densify`` puts it back.
BITMASK_CONFIG = "config.aprender-bitmask.json"
BITMASK_PARTS = (".values", ".mask", ".shape")
SPARSE24_PARTS = (".shape", ".compressed", ".bitmask")
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INTS = {"I64": np.int64, "I32": np.int32, "U64": np.uint64, "U32": np.uint32}


class Logical(TensorShape):
    """One logical tensor of a shard: ``name``, ``dtype`` (safetensors code), ``shape``,
    ``encoding`` ("dense", "sparse-24-bitmask" or "bitmask") and ``parts`` (the TensorInfo
    entries that store it, in data order)."""

    __slots__ = ("name", "dtype", "shape", "encoding", "parts")

    def __init__(self, name, dtype, shape, encoding, parts):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)
        self.encoding, self.parts = encoding, parts

    @property
    def nbytes(self):
        return self.size * self.itemsize

    @property
    def stored_bytes(self):
        return sum(p.nbytes for p in self.parts)

    def __repr__(self):
        return f"Logical({self.name!r}, {self.dtype}, {self.shape}, {self.encoding})"


def aprender_info(metadata):
    """A shard's ``aprender`` metadata entry as a dict, or None when there is none or it is not
    a JSON object aprender could have written (parsed by the hardened JSON reader: hostile
    nesting, lengths or numbers never reach Python's parser)."""
    from .strictjson import loads

    raw = metadata.get("aprender")
    if not isinstance(raw, str):
        return None
    try:
        info = loads(raw.encode("utf-8", "surrogatepass"), "aprender metadata")
    except CheckpointError:
        return None
    return info if isinstance(info, dict) else None


def shard_format(metadata):
    """The ``format`` recorded in a shard's ``aprender`` metadata, or None."""
    info = aprender_info(metadata)
    fmt = info.get("format") if info is not None else None
    return fmt if isinstance(fmt, str) else None


def _fail(sf, name, why):
    raise CompressedFormatError(f"{display(sf.path)}: tensor {short_repr(name)}: {why}")


def _read_shape(sf, t, label, dtype):
    """The dense shape stored in a ``.shape`` tensor (integers, at most 64 of them, >= 0) of a
    tensor of ``dtype``: refused, like a header's shape, when numpy could not hold it (the
    product of its non-zero dimensions times the item size reaches 2**63, zeros or not)."""
    if t.dtype not in _INTS or t.size > MAX_DIMS or not 1 <= len(t.shape) <= 2 \
            or (len(t.shape) == 2 and t.shape[1] != 1):
        _fail(sf, t.name, f"{label} needs a 1-D (or n x 1) integer tensor of at most {MAX_DIMS} "
                          f"dimensions, got {t.dtype} {list(t.shape)}")
    dims = sf.words(t.name).view(_INTS[t.dtype]).tolist() if t.size else []
    if not dims or any(d < 0 for d in dims):
        _fail(sf, t.name, f"{label} holds an invalid shape {short_repr(dims)}")
    if dtype not in DTYPE_SIZES or shape_too_large(dims, DTYPE_SIZES[dtype]):
        _fail(sf, t.name, f"{label} {short_repr(dims)} is too large for a tensor of "
                          f"{short_repr(dtype)}")
    return tuple(int(d) for d in dims)


def _sparse24(sf, prefix):
    shape_t, comp, bm = (sf.tensors[prefix + s] for s in SPARSE24_PARTS)
    if comp.dtype not in ("F16", "BF16", "F32", "I8") or len(comp.shape) != 2:
        _fail(sf, comp.name, f"sparse-24-bitmask values must be a 2-D F16, BF16, F32 or I8 "
                             f"tensor, got {comp.dtype} {list(comp.shape)}")
    shape = _read_shape(sf, shape_t, "sparse-24-bitmask shape", comp.dtype)
    rows = math.prod(shape[:-1])
    cols = shape[-1]
    if cols % 4 or comp.shape != (rows, cols // 2):
        _fail(sf, comp.name, f"holds {list(comp.shape)} values; dense shape {list(shape)} needs "
                             f"[{rows}, {cols // 2}] (and a last dimension divisible by 4)")
    if bm.dtype != "U8" or bm.shape != (rows, -(-cols // 8)):
        _fail(sf, bm.name, f"sparse-24-bitmask mask must be U8 [{rows}, {-(-cols // 8)}], got "
                           f"{bm.dtype} {list(bm.shape)}")
    parts = sorted((shape_t, comp, bm), key=lambda t: t.begin)
    return Logical(prefix + ".weight", comp.dtype, shape, "sparse-24-bitmask", parts)


def _bitmask(sf, name):
    vals, mask, shape_t = (sf.tensors[name + s] for s in BITMASK_PARTS)
    shape = _read_shape(sf, shape_t, "bitmask shape", vals.dtype)
    n = math.prod(shape)
    if len(vals.shape) != 1 or vals.size > n:
        _fail(sf, vals.name, f"bitmask values must be 1-D with at most {n} elements (dense "
                             f"shape {list(shape)}), got {list(vals.shape)}")
    if mask.dtype != "U8" or mask.shape != (-(-n // 8),):
        _fail(sf, mask.name, f"bitmask mask must be U8 [{-(-n // 8)}] for {n} elements, got "
                             f"{mask.dtype} {list(mask.shape)}")
    parts = sorted((vals, mask, shape_t), key=lambda t: t.begin)
    return Logical(name, vals.dtype, shape, "bitmask", parts)


def logical_tensors(sf):
    """The logical tensors of a SafetensorsFile in data order (a group sits where its first
    part is stored)."""
    names = sf.tensors
    packed = shard_format(sf.metadata) == "bitmask"
    used, out, seen = set(), [], {}
    for t in sf:
        if t.name in used:
            continue
        lt = None
        for suffixes, make in ((SPARSE24_PARTS, _sparse24), (BITMASK_PARTS, _bitmask)):
            if make is _bitmask and not packed:
                continue
            for s in suffixes:
                if t.name.endswith(s):
                    base = t.name[:-len(s)]
                    if all(base + x in names for x in suffixes) \
                            and not any(base + x in used for x in suffixes):
                        lt = make(sf, base)
                        break
            if lt is not None:
                break
        if lt is None:
            lt = Logical(t.name, t.dtype, t.shape, "dense", [t])
        if lt.name in seen:
            raise CompressedFormatError(
                f"{display(sf.path)}: tensor {short_repr(lt.name)} appears twice in this shard ("
                + _what(seen[lt.name]) + " and " + _what(lt) + "): a loader would take either")
        seen[lt.name] = lt
        used.update(p.name for p in lt.parts)
        out.append(lt)
    if packed:  # every tensor aprender lists as pruned here is one complete group here
        listed = (aprender_info(sf.metadata) or {}).get("pruned")
        groups = {lt.name for lt in out if lt.encoding == "bitmask"}
        for name in listed if isinstance(listed, list) else ():
            if isinstance(name, str) and name not in groups:
                _fail(sf, name, "listed as pruned in this bitmask shard but not stored here as "
                      "a complete group (" + ", ".join(name + x for x in BITMASK_PARTS) + ")")
    return out


def _what(lt):
    if lt.encoding == "dense":
        return "a plain tensor"
    return f"a {lt.encoding} group of " + ", ".join(short_repr(p.name) for p in lt.parts)


def _groups_of(names, packed):
    """(base, suffixes) of every compressed group whose parts are all among ``names``."""
    out = []
    for suffixes, ok in ((SPARSE24_PARTS, True), (BITMASK_PARTS, packed)):
        if not ok:
            continue
        for n in names:
            if n.endswith(suffixes[0]):
                base = n[:-len(suffixes[0])]
                if all(base + x in names for x in suffixes):
                    out.append((base, suffixes))
    return out


def checkpoint_layout(ckpt):
    """``{shard: [Logical]}`` of a Checkpoint under the one rule every reader applies (inspect,
    densify, prune, load_dense, load_state_dict): a logical name appears once in the whole
    checkpoint (not a compressed group beside a plain tensor of its name, not in two shards),
    and a compressed group's parts are stored in one shard.  Anything else is a
    CompressedFormatError naming the tensor and the shards."""
    layout, where = {}, {}
    for s in ckpt.shards:
        layout[s] = logical_tensors(ckpt.files[s])
        for lt in layout[s]:
            if lt.name in where:
                raise CompressedFormatError(
                    f"{display(ckpt.shard_path(s))}: tensor {short_repr(lt.name)} appears "
                    f"twice in the checkpoint (also in {display(ckpt.shard_path(where[lt.name]))})"
                    ": a loader would take either")
            where[lt.name] = s
    if len(ckpt.shards) > 1:  # a group whose parts are spread over shards
        stored = {}
        for s in ckpt.shards:
            for t in ckpt.files[s]:
                stored[t.name] = s
        packed = any(shard_format(ckpt.files[s].metadata) == "bitmask" for s in ckpt.shards)
        for base, suffixes in _groups_of(stored, packed):
            shards = {stored[base + x] for x in suffixes}
            if len(shards) > 1:
                raise CompressedFormatError(
                    f"{display(ckpt.path)}: the parts of compressed tensor {short_repr(base)} ("
                    + ", ".join(short_repr(base + x) for x in suffixes) + ") are split across "
                    "shards " + ", ".join(display(x) for x in sorted(shards))
                    + "; a group is stored in one shard")
    return layout


def pack_bitmask(words, keep):
    """(values, packed mask) of aprender's bitmask format from a tensor's flat words and its
    flat keep-mask (uint8 or bool, one byte per element)."""
    k = np.asarray(keep).view(np.bool_).reshape(-1)
    return np.ascontiguousarray(words[k]), np.packbits(k, bitorder="little")


def decode(sf, lt, n_threads=None):
    """The flat dense words (uint8/16/32/64) of logical tensor ``lt`` of ``sf``."""
    if lt.encoding == "dense":
        return sf.words(lt.name)
    if lt.encoding == "bitmask":
        return _decode_bitmask(sf, lt)
    return _decode_sparse24(sf, lt, n_threads)


def _decode_bitmask(sf, lt):
    vals, mask = (sf.tensors[lt.name + s] for s in BITMASK_PARTS[:2])
    n = lt.size
    bits = sf.words(mask.name)
    keep = np.unpackbits(bits, count=n, bitorder="little").view(np.bool_) if n else \
        np.zeros(0, np.bool_)
    kept = int(np.count_nonzero(keep))
    if kept != vals.size:
        _fail(sf, mask.name, f"has {kept} bits set but {short_repr(vals.name)} holds "
                             f"{vals.size} values")
    if n % 8 and bits.size and int(bits[-1]) >> (n % 8):
        _fail(sf, mask.name, "padding bits after the last element are not zero")
    out = np.zeros(n, _WORDS[lt.itemsize])
    if kept:
        out[keep] = sf.words(vals.name)
    return out


def _decode_sparse24(sf, lt, n_threads):
    from .. import sparse24
    from ..errors import PruningError

    p = lt.name[:-len(".weight")]
    comp = sf.tensors[p + ".compressed"]
    bitmask = sf.array(p + ".bitmask")
    cols = lt.shape[-1]
    if cols % 8 and bitmask.size and np.any(bitmask[:, -1] >> (cols % 8)):
        _fail(sf, p + ".bitmask", "padding bits after the last column are not zero")
    tensors = {p + ".shape": np.asarray(lt.shape, np.int64),
               p + ".compressed": sf.array(comp.name), p + ".bitmask": bitmask}
    try:
        dense = sparse24.Sparse24Tensor.from_tensors(tensors, p).to_dense(n_threads=n_threads)
    except PruningError as exc:
        _fail(sf, comp.name, f"not a valid sparse-24-bitmask tensor ({exc})")
    if isinstance(dense, Bits16):
        dense = dense.bits
    return np.ascontiguousarray(dense).reshape(-1).view(_WORDS[lt.itemsize])


def _as_array(words, lt):
    """Words as the tensor's numpy dtype in its shape (Bits16 for bfloat16)."""
    if lt.dtype == "BF16":
        return Bits16(words.reshape(lt.shape), "bfloat16")
    from .safetensors import _NUMPY

    dt = _NUMPY.get(lt.dtype)
    if dt is None:
        return words.reshape(lt.shape)
    return words.view(dt).reshape(lt.shape)


def dense_tensors(path, *, n_threads=None):
    """(name, dtype code, fresh dense array) of every logical tensor of a checkpoint (a
    ``.safetensors`` file or a folder, in any format aprender writes or reads), in shard and
    data order, after the checks of :func:`checkpoint_layout`.  Arrays as :func:`load_dense`
    returns them; the code says what raw words stand for (F8 types come as uint8)."""
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(os.fspath(path))
    layout = checkpoint_layout(ckpt)
    for s in ckpt.shards:
        sf = ckpt.files[s]
        for lt in layout[s]:
            yield lt.name, lt.dtype, _as_array(np.array(decode(sf, lt, n_threads)), lt)


def load_dense(path, *, n_threads=None):
    """Every logical tensor of a checkpoint (a ``.safetensors`` file or a folder, in any format
    aprender writes or reads) as a dense array: ``{name: array}`` in shard and data order.
    bfloat16 tensors come back as ``aprender.Bits16``, float8 ones as their uint8 bytes; every
    array is a fresh copy (the file is not kept open)."""
    return {name: a for name, _, a in dense_tensors(path, n_threads=n_threads)}
