"""More than 2**31 elements: sizes and indices must be 64-bit all the way through the kernels.

One float16 array of 2**31 + 4096 elements (4 GiB) is shared by the tests of this module; with the
masks the peak is about 8 GiB.  Skipped when less than 14 GiB of memory is available.

Layout of the values (n = 2**31 + 4096):
  * the last 16 elements are 0.25 (the smallest magnitudes, all beyond index 2**31);
  * elsewhere every index divisible by 3 holds -0.5 and the others hold 1.0 (a huge tie class).
The test prunes all the 0.25s, all the -0.5s and the first r of the 1.0s, with r chosen so the
boundary of the tie class lies beyond index 2**31: the exact answer is known without a reference.
"""
import numpy as np
import pytest

from aprender import Bits16
from aprender.pruning import SparsityMask, SparsityPattern, magnitude_mask, magnitude_nm_mask

pytestmark = pytest.mark.slow

N = 2**31 + 4096
TAIL = 16
NEED_GIB = 14


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _multiples_of_3(lo, hi):
    """How many i in [lo, hi) are divisible by 3."""
    return (hi + 2) // 3 - (lo + 2) // 3


def _one_index(j):
    """Flat index of the j-th (0-based) 1.0, counting from the start."""
    return 3 * (j // 2) + 1 + (j % 2)


@pytest.fixture(scope="module")
def huge():
    if _mem_available_gib() < NEED_GIB:
        pytest.skip(f"needs about {NEED_GIB} GiB of available memory "
                    f"({_mem_available_gib():.1f} GiB available)")
    a = np.empty(N, np.float16)
    a[:] = 1.0
    a[::3] = -0.5
    a[-TAIL:] = 0.25
    yield a
    del a


def test_magnitude_mask_count_is_exact_beyond_2_31(huge):
    body = N - TAIL
    halves = _multiples_of_3(0, body)
    ones = body - halves
    r = ones - 500  # the last pruned 1.0 lies far beyond index 2**31
    boundary = _one_index(r - 1)
    assert boundary > 2**31
    k = TAIL + halves + r
    s = k / N
    p = s * N
    assert int(np.ceil(p - 0.5)) == k  # the documented rounding gives exactly k
    m = magnitude_mask(huge, s)
    keep = m.keep
    assert keep.shape == (N,)
    assert m.num_zeros() == k
    assert N - np.count_nonzero(keep) == k
    assert not keep[-TAIL:].any()
    assert np.count_nonzero(keep[:boundary + 1]) == 0
    kept_after = (body - (boundary + 1)) - _multiples_of_3(boundary + 1, body)
    assert np.count_nonzero(keep[boundary + 1:]) == kept_after
    assert keep[_one_index(r)] and not keep[boundary]

    # apply at the far end: exactly the kept 1.0s survive
    w = huge.copy()
    m.apply(w)
    assert w[boundary] == 0 and w[_one_index(r)] == 1.0 and not w[-TAIL:].any()
    assert np.count_nonzero(w) == kept_after
    del w, keep, m


def test_magnitude_nm_mask_far_end(huge):
    tail = np.array([0.25, 3.0, -4.0, 0.5] * (TAIL // 4), np.float16)
    w = huge.copy()
    w[-TAIL:] = tail
    bits = Bits16(w.view(np.uint16), "float16")
    m = magnitude_nm_mask(bits, 2, 4)
    keep = m.keep
    assert keep.shape == (N,)
    assert np.count_nonzero(keep) == N // 2
    ok, total = SparsityPattern.nm(2, 4).count_groups(keep)
    assert ok == total == N // 4
    # groups across index 2**31 (-0.5 and 1.0 ties) and the distinct tail
    for lo in (2**31 - 16, N - 32):
        window = w[lo:lo + 32].astype(np.float64)
        want = np.zeros(32, bool)
        for g in range(8):
            grp = np.abs(window[4 * g:4 * g + 4])
            order = np.argsort(grp, kind="stable")
            want[4 * g + order[2:]] = True
        assert np.array_equal(keep[lo:lo + 32], want), lo
    assert np.array_equal(keep[-TAIL:], np.tile([False, True, True, False], TAIL // 4))

    # apply through the Bits16 wrapper, far end only checked against the mask
    SparsityMask(keep, SparsityPattern.nm(2, 4)).apply(bits)
    assert np.array_equal(w[-TAIL:] != 0, keep[-TAIL:])
    assert np.count_nonzero(w[2**31:]) == np.count_nonzero(keep[2**31:])
    del w, bits, keep, m
