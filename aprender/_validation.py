"""One place that turns user input into kernel-ready arrays or a clear, typed error."""
import math
import numbers
import operator
import os

import numpy as np

from .errors import (InsufficientMemoryError, InvalidArgumentError, InvalidDTypeError,
                     InvalidPatternError, InvalidShapeError, InvalidSparsityError,
                     NumericalInstabilityError)
from ._threads import MAX_THREADS, effective_n_threads  # noqa: F401 - re-exported
from ._adapters import Bits16, is_cupy, is_torch, to_numpy_view  # noqa: F401 - re-exported

# 16-bit float formats: the kernel format code, the +inf bit pattern by format (also the exponent
# mask: a value is not finite when all its bits are set), every bit but the sign, the sign bit.
# The one Python definition of each (the C one is in aprender/_kernels/apr_keys.h).
F16, BF16 = 1, 2
INF16 = {F16: 0x7C00, BF16: 0x7F80}
ABS16, SIGN16 = 0x7FFF, 0x8000


class Floats:
    """A validated floating array ready for the kernels.

    ``array``: C-contiguous, native byte order, in the caller's dtype (ml_dtypes bfloat16 kept);
    ``kernel``: the same memory as float32/float64/uint16 for the Cython kernels;
    ``fmt``: 0 for float32/float64, F16 or BF16 for 16-bit formats."""

    __slots__ = ("array", "kernel", "fmt", "dtype_name")

    def __init__(self, array, kernel, fmt, dtype_name):
        self.array = array
        self.kernel = kernel
        self.fmt = fmt
        self.dtype_name = dtype_name

    @property
    def inf16(self):
        return INF16.get(self.fmt, 0)

    @property
    def shape(self):
        return self.array.shape

    @property
    def size(self):
        return self.array.size


def _is_bf16(dtype):
    return dtype.kind == "V" and dtype.name == "bfloat16" or str(dtype) == "bfloat16"


def short_repr(value, limit=80):
    """repr(value) cut to ``limit`` characters, for error messages about hostile input (a
    megabyte string, an int with more digits than Python will print)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - repr itself may refuse (huge ints) or be broken
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def as_array(x, name="values"):
    """np.asarray(x), or InvalidDTypeError naming what could not be converted (ragged nested
    sequences, objects whose __array__ fails, ...)."""
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot turn into an array
        raise InvalidDTypeError(f"{name}: cannot convert {type(x).__name__} to an array "
                                f"({short_repr(str(exc), 160)})") from None


def as_real(value, name, error=InvalidArgumentError):
    """A real number (int, float, Fraction, numpy scalar or 0-d array) as a Python float.

    Bools, strings, complex numbers, None, arrays with elements and numbers beyond the float
    range raise ``error`` naming the value; NaN and infinities are returned (the caller decides
    its domain)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be a real number, got the bool {value!r}")
    if not isinstance(value, numbers.Real):
        raise error(f"{name} must be a real number, got {type(value).__name__} "
                    f"{short_repr(value)}")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):
        raise error(f"{name} is too large for a float: {short_repr(value)}") from None


def as_floats(x, name="values", *, allow_empty=True, min_ndim=1):
    """Validate a floating array and return a Floats view (copying once if it must)."""
    if hasattr(x, "values") and hasattr(x, "method") and hasattr(x, "stats"):
        x = x.values  # ImportanceScores
    if isinstance(x, Bits16):
        arr = x.bits
        fmt = BF16 if x.format == "bfloat16" else F16
        dtype_name = x.format
    else:
        if is_cupy(x):
            raise InvalidDTypeError(f"{name}: CuPy arrays are only accepted by aprender.sparse24; "
                                    "call .get() to bring the array to the host")
        if is_torch(x):
            x = to_numpy_view(x)
            if isinstance(x, Bits16):
                return as_floats(x, name, allow_empty=allow_empty, min_ndim=min_ndim)
        arr = as_array(x, name)
        dt = arr.dtype
        if _is_bf16(dt):
            fmt, dtype_name = BF16, "bfloat16"
        elif dt.kind == "f" and dt.itemsize in (2, 4, 8):
            fmt = F16 if dt.itemsize == 2 else 0
            dtype_name = {2: "float16", 4: "float32", 8: "float64"}[dt.itemsize]
        else:
            raise InvalidDTypeError(
                f"{name}: expected a floating array (float16, bfloat16, float32 or float64), "
                f"got dtype {dt}" + (" (wrap raw bfloat16 bits in aprender.Bits16)"
                                     if dt == np.uint16 else ""))
    if arr.ndim < min_ndim:
        raise InvalidShapeError(f"{name}: expected an array with at least {min_ndim} dimension(s), "
                                f"got a {arr.ndim}-d array")
    if arr.size == 0 and not allow_empty:
        raise InvalidShapeError(f"{name}: empty array (shape {arr.shape})")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if isinstance(x, Bits16) or arr.dtype == np.uint16:
        kernel = arr
    elif fmt:
        kernel = arr.view(np.uint16)
    else:
        kernel = arr
    return Floats(arr, kernel, fmt, dtype_name)


def decode16(bits, fmt):
    """Exact float32 values of 16-bit float bit patterns (fmt F16 or BF16)."""
    if fmt == BF16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def raise_nonfinite(f, name="values"):
    """Raise NumericalInstabilityError naming the first non-finite element of f (a Floats)."""
    flat = f.kernel.reshape(-1)
    if f.fmt:
        bad = (flat & f.inf16) == f.inf16
    else:
        bad = ~np.isfinite(flat)
    i = int(np.argmax(bad))
    idx = np.unravel_index(i, f.shape) if f.array.ndim else ()
    idx = tuple(int(v) for v in idx)
    if f.fmt:
        raw = int(flat[i])
        kind = "NaN" if raw & ABS16 > f.inf16 else ("-inf" if raw & SIGN16 else "inf")
    else:
        v = float(flat[i])
        kind = "NaN" if math.isnan(v) else ("-inf" if v < 0 else "inf")
    raise NumericalInstabilityError(
        f"{name} contains {kind} at index {idx} (flat index {i}); aprender needs finite values",
        index=idx, value=kind)


def check_bool(value, name):
    """A flag: True/False (or numpy bools) as a Python bool; anything else (strings, arrays, 0/1
    numbers, None) raises InvalidArgumentError naming the value."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgumentError(f"{name} must be True or False, got {type(value).__name__} "
                               f"{short_repr(value)}")


def check_sparsity(sparsity, name="sparsity"):
    """A fraction in [0, 1] as a Python float; bools, strings, NaN and out-of-range values raise."""
    value = as_real(sparsity, f"{name} (a fraction in [0, 1])", InvalidSparsityError)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidSparsityError(f"{name} must be in [0, 1], got {short_repr(sparsity)}")
    return value


def prune_count(sparsity, n):
    """Number of elements to prune: the integer nearest sparsity * n (float64), halves down."""
    p = sparsity * n
    lo = math.floor(p)
    return int(lo if p - lo <= 0.5 else lo + 1)


def check_int(value, name, *, minimum=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__} "
                                   f"{short_repr(value)}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {size_text(value)}")
    return value


def size_text(n):
    """An integer of any size for messages: exact below 10**19, else as a power of ten (str()
    refuses integers of more than 4300 digits)."""
    if abs(n) < 10 ** 19:
        return str(n)
    return f"{'-' if n < 0 else ''}10^{int(math.log10(abs(n)))}"


def format_bytes(n):
    """A byte count for messages: exact below 1 KiB, else binary units with the exact count
    (an integer of any size: beyond 2**80 as a power of ten)."""
    if n < 1024:
        return f"{n} bytes"
    if n >= 1 << 80:
        return f"about {size_text(n)} bytes"
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"


def memory_limit():
    """The most bytes one allocation may take: this machine's physical memory (2**63 - 1 when
    the system does not say).  Anything larger could only swap or fail, so statistics,
    Hessians and workspaces beyond it are refused before anything is allocated."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return (1 << 63) - 1
    if pages <= 0 or size <= 0:
        return (1 << 63) - 1
    return min(pages * size, (1 << 63) - 1)


def require_memory(nbytes, what):
    """Refuse, before allocating, ``nbytes`` for ``what`` (a phrase naming the caller's object)
    when no machine could address it (InvalidArgumentError) or this one has less physical
    memory (InsufficientMemoryError)."""
    if nbytes > (1 << 63) - 1:
        raise InvalidArgumentError(f"{what} would need {format_bytes(nbytes)}, more than any "
                                   "array can address")
    limit = memory_limit()
    if nbytes > limit:
        raise InsufficientMemoryError(f"{what} would need {format_bytes(nbytes)}, more than "
                                      f"this machine's memory ({format_bytes(limit)})")


def resolve_threads(n_threads):
    """The thread count for a call (see aprender._threads): None -> what OpenMP, the CPU
    affinity and the cgroup quota allow now; else an int in [1, MAX_THREADS]; 1 in a forked
    child.  Kernels lower it further to their work's chunk count."""
    return effective_n_threads(n_threads)


def check_nm(n, m):
    for v, nm in ((n, "n"), (m, "m")):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise InvalidPatternError(f"N:M pattern needs integer {nm}, got {v!r}")
    n, m = int(n), int(m)
    if m <= 0 or n <= 0:
        raise InvalidPatternError(f"N:M pattern needs 1 <= N <= M, got {n}:{m}")
    if n > m:
        raise InvalidPatternError(f"N:M pattern needs N <= M, got {n}:{m}")
    if m > 1024:
        raise InvalidPatternError(f"N:M pattern supports M up to 1024, got M={m}")
    return n, m


def check_axis(axis, ndim, name="axis"):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise InvalidShapeError(f"{name} must be an integer, got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise InvalidShapeError(f"{name} {axis} is out of range for an array with {ndim} dimension(s)")
    return axis % ndim
