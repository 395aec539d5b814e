"""Apply a keep-mask in place: w[i] = 0 where keep[i] == 0, for any dtype, by its bit pattern.

Zeroing the bits gives +0.0 for every IEEE float (and bfloat16), 0 for integers; NaN weights that
are pruned become 0 too (np.multiply would keep them NaN).

Every def checks the sizes of its buffers (typed errors), so no call from Python can read or write
out of bounds."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from cython.parallel cimport prange

from ._openmp cimport threads_for
from ._guard import guard
from ..errors import ShapeMismatchError

ctypedef fused word_t:
    uint8_t
    uint16_t
    uint32_t
    uint64_t


def apply_mask(word_t[::1] w not None, const uint8_t[::1] keep not None, int n_threads):
    """w[i] = 0 (all bits) where keep[i] == 0; keep holds exactly one byte per element of w."""
    cdef Py_ssize_t n = w.shape[0], i
    cdef int nt = threads_for(n_threads, n, n)
    if keep.shape[0] != n:
        raise ShapeMismatchError(f"keep holds {keep.shape[0]} elements, the weights {n}")
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            w[i] = w[i] & (<word_t>0 - <word_t>(keep[i] != 0))


def count_nonzero_u8(const uint8_t[::1] keep not None, int n_threads):
    """Number of non-zero bytes (kept elements) of a mask."""
    cdef Py_ssize_t n = keep.shape[0], i, total = 0
    cdef int nt = threads_for(n_threads, n, n)
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            total += keep[i] != 0
    return total


guard(globals(), ["apply_mask", "count_nonzero_u8"])
