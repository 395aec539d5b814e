"""A small, streaming safetensors reader and writer built on numpy and mmap.

The reader parses the header itself (8-byte little-endian length, then JSON), validates every
entry against the file size, and hands out one tensor at a time as a read-only ``np.memmap``
view, so a checkpoint of any size is read with memory bounded by the largest tensor.  bfloat16
tensors come back as ``aprender.Bits16(uint16 bits, "bfloat16")``, which every aprender entry
point accepts; ``raw=True`` gives the plain bytes-per-element unsigned view of any tensor.

The format (https://github.com/huggingface/safetensors): ``u64 N | N bytes of JSON | data``; the
JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data section) and may hold ``"__metadata__"``: a str -> str map.
"""
import json
import math
import mmap
import os
import struct

import numpy as np

from .._validation import Bits16, short_repr
from ..errors import CheckpointError
from . import strictjson
from .files import display, open_regular

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsFile", "read_header", "encode_header",
           "write_safetensors", "DTYPE_SIZES", "FLOAT_DTYPES", "dtype_code"]

MAX_HEADER = 100_000_000  # bytes, as the reference implementation
MAX_DIMS = 64

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
          "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64}
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def dtype_code(array):
    """The safetensors dtype code of a numpy array or Bits16."""
    if isinstance(array, Bits16):
        return "BF16" if array.format == "bfloat16" else "F16"
    dt = np.asarray(array).dtype
    if dt.name == "bfloat16":
        return "BF16"
    for code, np_dt in _NUMPY.items():
        if dt == np_dt:
            return code
    raise CheckpointError(f"dtype {dt} has no safetensors code")


class TensorShape:
    """What a tensor's safetensors dtype code and shape say: element count, item size, whether
    it is a float (shared by header entries and the logical tensors of compressed formats)."""

    __slots__ = ()

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return DTYPE_SIZES[self.dtype]

    @property
    def is_float(self):
        return self.dtype in FLOAT_DTYPES


class TensorInfo(TensorShape):
    """One header entry: ``begin``/``end`` are byte offsets relative to the data section."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name, dtype, shape, begin, end):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)
        self.begin = begin
        self.end = end

    @property
    def nbytes(self):
        return self.end - self.begin

    def entry(self):
        return {"dtype": self.dtype, "shape": list(self.shape),
                "data_offsets": [self.begin, self.end]}

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape})"


def _looks_like(head):
    """"JSON" or "text" when the first bytes of a file are plainly not a header length (a
    safetensors length field of printable bytes would claim petabytes), else None."""
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return None


def read_header(path):
    """Parse and validate the header of ``path``: returns (header_bytes_len, tensors, metadata)
    where tensors is a list of TensorInfo in data order.  Raises CheckpointError.

    At least as strict as the format's reference implementation: the header is at most
    100,000,000 bytes of UTF-8 JSON; offsets and dimensions are JSON integers; dtypes are known
    codes; names are unique; tensors' byte ranges start at 0, are contiguous, do not overlap
    and cover the data section exactly; ``__metadata__`` maps strings to strings.  Shapes must
    be representable by numpy (at most 64 dimensions, element counts below 2**63)."""
    shown = display(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shown}: not a safetensors file ({size} bytes, too small "
                                  "for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            looks = _looks_like(head)
            if looks:  # a text or JSON file given by mistake: no point quoting a length
                raise CheckpointError(f"{shown}: not a safetensors file (it looks like {looks})")
            raise CheckpointError(
                f"{shown}: not a safetensors file: the header length field says {n} "
                f"bytes but the file has {size} bytes"
                + (f" and a header may not exceed {MAX_HEADER}" if n > MAX_HEADER else ""))
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{shown}: file changed while its header was read")
    header = strictjson.loads(raw, f"{shown}: corrupt safetensors header",
                              strictjson.HEADER_LIMITS)
    del raw
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{shown}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors = [_tensor_info(shown, name, e) for name, e in header.items()]
    del header
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in tensors:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else \
                f"starts at data byte {t.begin}, leaving a gap after byte {pos}"
            raise CheckpointError(f"{shown}: tensor {short_repr(t.name)} {what} (tensors must be "
                                  "contiguous from byte 0)")
        pos = t.end
    if pos != data_size:
        if pos > data_size:
            last = max(tensors, key=lambda t: t.end)
            raise CheckpointError(f"{shown}: truncated file: tensor {short_repr(last.name)} "
                                  f"needs {pos} data bytes but the file holds {data_size}")
        raise CheckpointError(f"{shown}: {data_size - pos} bytes after the last tensor (the "
                              "tensors must cover the data section exactly)")
    return n, tensors, metadata


def shape_too_large(shape, itemsize):
    """True when numpy cannot hold an array of ``shape`` and ``itemsize``: the product of its
    non-zero dimensions (what numpy must index, zeros aside) times the item size reaches
    2**63, whether or not a zero makes the array empty."""
    return math.prod(max(v, 1) for v in shape) * itemsize >= 1 << 63


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(shown, name, e):
    where = f"{shown}: tensor {short_repr(name)}"
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: header entry is not a JSON object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: "
                              f"{', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_int(v) and v >= 0 for v in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of integers >= 0")
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{where}: {len(shape)} dimensions (at most {MAX_DIMS})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(v) for v in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with "
                              "0 <= begin <= end")
    if shape_too_large(shape, DTYPE_SIZES[dtype]):
        raise CheckpointError(f"{where}: shape {shape} is too large to address")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise CheckpointError(
            f"{where}: {end - begin} bytes do not fit shape {shape} of {dtype}")
    return TensorInfo(name, dtype, shape, begin, end)


def _identity(st):
    """What says a path still names the file that was read: device, inode, modification time
    and size (a replaced file, one rewritten in place, or a link swapped in all change it)."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class SafetensorsFile:
    """A parsed safetensors file; tensors are mapped one at a time, on demand.  Every access
    reopens the file as a regular file and checks that it is still the file whose header was
    read (same device, inode, modification time and size): a file truncated under a memory map
    would crash the process, and a file replaced or swapped for a symlink mid-run would be
    read against another file's header."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            before = os.stat(self.path)
        except OSError:
            before = None  # read_header says why, in its words
        self.header_len, infos, self.metadata = read_header(self.path)
        after = os.stat(self.path)
        if before is not None and _identity(before) != _identity(after):
            raise CheckpointError(f"{display(self.path)}: changed while its header was read")
        self.identity = _identity(after)
        self.data_start = 8 + self.header_len
        self.infos = infos  # data order
        self.tensors = {t.name: t for t in infos}
        self.size = self.data_start + (infos[-1].end if infos else 0)

    def __reduce__(self):
        # sent to another process (a Dask worker) by path: reopened there on first use (never
        # where it is only passed through, such as a scheduler), at most once per process, and
        # refused if it is not the file that was read here
        return _Reopened, (os.path.abspath(self.path), self.size, self.header_len,
                           self.identity[1], self.identity[2])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)

    def __contains__(self, name):
        return name in self.tensors

    def _open(self):
        f = open_regular(self.path)
        st = os.fstat(f.fileno())
        if _identity(st) != self.identity:
            f.close()
            what = "changed size" if st.st_size != self.size else \
                "was replaced or modified (another file, a rewrite or a swapped link)"
            raise CheckpointError(f"{display(self.path)}: {what} since its header was read")
        return f

    def words(self, name, populate=True, first=0, count=None):
        """Read-only flat view of the raw elements as unsigned words (uint8/16/32/64): the
        whole tensor, or ``count`` elements from element ``first`` (only that range is mapped).
        ``populate``: fault the mapped range in at once (for full passes; False for sparse
        access such as sampling)."""
        t = self.tensors[name]
        dt = _WORDS[t.itemsize]
        count = t.size - first if count is None else count
        if first < 0 or count < 0 or first + count > t.size:
            raise CheckpointError(f"elements [{first}, {first + count}) outside tensor "
                                  f"{short_repr(name)} of {t.size} elements")
        if count == 0:
            return np.empty(0, dt)
        start = self.data_start + t.begin + first * t.itemsize
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with self._open() as f:
            # MAP_POPULATE: one syscall faults the whole range in (page cache permitting)
            # instead of a page fault per 4 KiB; the map is released with the last view
            mm = mmap.mmap(f.fileno(), start - base + count * t.itemsize, offset=base,
                           flags=mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate
                                                    else 0),
                           prot=mmap.PROT_READ)
        return np.frombuffer(mm, dtype=dt, count=count, offset=start - base)

    def read_into(self, name, first, out):
        """Read elements [first, first + len(out)) of the tensor into the array ``out``
        (a plain read: no mapping)."""
        t = self.tensors[name]
        if first < 0 or first + out.size > t.size or out.itemsize != t.itemsize:
            raise CheckpointError(f"read of elements [{first}, {first + out.size}) outside "
                                  f"tensor {short_repr(name)} of {t.size} elements")
        pos = self.data_start + t.begin + first * t.itemsize
        view = memoryview(out).cast("B")
        with self._open() as f:
            f.seek(pos)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{display(self.path)}: unexpected end of file in "
                                          f"{short_repr(name)}")
                got += n

    def array(self, name, raw=False):
        """Read-only memory-mapped view in the tensor's shape: numpy dtype, or Bits16 for BF16
        (float16 stays numpy float16); F8 types come back as uint8.  ``raw=True``: unsigned words."""
        t = self.tensors[name]
        w = self.words(name)
        if raw or t.dtype in ("BF16",) or t.dtype.startswith("F8"):
            arr = w.reshape(t.shape)
            return Bits16(arr, "bfloat16") if t.dtype == "BF16" and not raw else arr
        return w.view(_NUMPY[t.dtype]).reshape(t.shape)

    def copy_to(self, name, fd):
        """Append the tensor's bytes to the open file descriptor ``fd`` (no Python buffer)."""
        t = self.tensors[name]
        with self._open() as f:
            copy_range(f, self.data_start + t.begin, t.nbytes, fd)


def copy_range(src, offset, count, fd):
    """Copy ``count`` bytes at ``offset`` of the open binary file ``src`` to the current
    position of ``fd``."""
    if count == 0:
        return
    sfd = src.fileno()
    done = 0
    if hasattr(os, "sendfile"):
        try:
            while done < count:
                sent = os.sendfile(fd, sfd, offset + done, count - done)
                if sent == 0:
                    raise CheckpointError(f"{display(getattr(src, 'name', 'file'))}: "
                                          "unexpected end of file")
                done += sent
            return
        except OSError as exc:
            if done or exc.errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP
                raise
    src.seek(offset + done)
    buf = bytearray(1 << 23)
    view = memoryview(buf)
    while done < count:
        got = src.readinto(view[:min(len(buf), count - done)])
        if not got:
            raise CheckpointError(f"{display(getattr(src, 'name', 'file'))}: unexpected end "
                                  "of file")
        write_all(fd, view[:got])
        done += got


def write_all(fd, buf):
    """os.write until every byte of ``buf`` (bytes-like or C-contiguous array) is written."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else memoryview(buf)
    while len(mv):
        n = os.write(fd, mv[: 1 << 30])
        mv = mv[n:]


def encode_header(entries, metadata=None):
    """The 8-byte length plus JSON header, padded with spaces to a multiple of 8 bytes.
    ``entries``: an ordered mapping name -> {"dtype", "shape", "data_offsets"}."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path, tensors, metadata=None):
    """Write ``tensors`` (mapping name -> numpy array or Bits16) to ``path`` in order (no temp
    file: callers that need atomicity write to a temporary name themselves)."""
    entries = {}
    pos = 0
    arrays = []
    for name, a in tensors.items():
        code = dtype_code(a)
        arr = a.bits if isinstance(a, Bits16) else np.asarray(a)
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d tensors 0-d
        entries[name] = {"dtype": code, "shape": list(arr.shape),
                         "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
        arrays.append(arr)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, encode_header(entries, metadata))
        for arr in arrays:
            if arr.nbytes:
                write_all(fd, arr.reshape(-1).view(np.uint8))
    finally:
        os.close(fd)


_REOPENED = {}


def _reopen(path, size, header_len, ino=None, mtime_ns=None):
    """The SafetensorsFile at ``path`` in this process (a pickled one: see __reduce__), checked
    to be the file that was read where it was pickled (same size, header length, inode and
    modification time; device numbers differ between machines sharing a filesystem)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{display(path)}: cannot read ({exc.strerror or exc})") from None
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
    sf = _REOPENED.get(key)
    if sf is None:
        sf = SafetensorsFile(path)
        if len(_REOPENED) > 4096:
            _REOPENED.clear()
        _REOPENED[key] = sf
    if (sf.size, sf.header_len) != (size, header_len) or \
            (ino is not None and (sf.identity[1], sf.identity[2]) != (ino, mtime_ns)):
        raise CheckpointError(f"{display(path)}: not the file that was planned (size "
                              f"{sf.size}, expected {size}): changed while being pruned, or a "
                              "different file at this path")
    return sf


class _Reopened:
    """A pickled SafetensorsFile on the receiving side: opened with :func:`_reopen` when first
    used, so that a file this process cannot read fails where it is read."""

    def __init__(self, path, size, header_len, ino=None, mtime_ns=None):
        self._args = (path, size, header_len, ino, mtime_ns)
        self._sf = None

    def __reduce__(self):
        return _Reopened, self._args

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_args", "_sf"):
            raise AttributeError(name)
        if self._sf is None:
            self._sf = _reopen(*self._args)
        return getattr(self._sf, name)
