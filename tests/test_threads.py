"""The one thread policy (aprender._threads): request, work, CPUs, OpenMP limits, fork safety,
and scratch memory sized by the work rather than by the thread count."""
import hashlib
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from aprender import _threads
from aprender._kernels import _openmp
from aprender._validation import resolve_threads
from aprender.errors import InvalidArgumentError
from aprender.pruning import magnitude_mask

CHILD_TIMEOUT = 120  # seconds: generous; a hang shows up as a failure, never as a stuck suite


def _work_array():
    # large enough for several threads (>= 4 * GRAIN elements)
    return np.random.default_rng(7).standard_normal((512, 1024)).astype(np.float32)


def _digest(mask):
    return hashlib.sha256(np.asarray(mask).tobytes()).hexdigest()


def _mask_digest_in_child(a, n_threads):
    return _digest(magnitude_mask(a, 0.5, n_threads=n_threads))


def _in_child(fn):
    """Run fn() in a forked child; return its bytes output (bounded wait, then a failure)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, fn())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + CHILD_TIMEOUT
    status = None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.05)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        pytest.fail(f"the forked child did not finish within {CHILD_TIMEOUT} s (OpenMP hang)")
    with os.fdopen(r, "rb") as fh:
        reply = fh.read()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, reply
    return reply


# ----------------------------------------------------------------------------------------------
# fork safety
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("child_threads", [2, None])
def test_kernels_work_in_a_child_forked_after_a_parallel_region(child_threads):
    a = _work_array()
    parent = _digest(magnitude_mask(a, 0.5, n_threads=2))  # starts OpenMP's thread pool
    reply = _in_child(lambda: _mask_digest_in_child(a, child_threads).encode()
                      + b" %d" % _threads.effective_n_threads(child_threads, work=10**7))
    digest, threads = reply.decode().split()
    assert digest == parent
    assert int(threads) == 1  # the child runs serial


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_kernels_work_in_a_child_of_a_process_whose_openmp_pool_another_library_started():
    """PyTorch shares libgomp: its parallel regions in the parent leave a pool the child lacks,
    although aprender never ran one there."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    x = torch.randn(1024, 1024)
    _ = torch.sort((x @ x).reshape(-1))  # torch's own OpenMP regions
    a = _work_array()
    want = np.asarray(magnitude_mask(a, 0.5, n_threads=1))  # serial: starts no pool of ours
    reply = _in_child(lambda: _mask_digest_in_child(a, 2).encode())
    assert reply.decode() == _digest(want)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork start method on this platform")
def test_kernels_work_in_a_fork_pool_worker():
    a = _work_array()
    parent = _digest(magnitude_mask(a, 0.5, n_threads=2))
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        res = pool.apply_async(_mask_digest_in_child, (a, 2))
        try:
            got = res.get(timeout=CHILD_TIMEOUT)
        except multiprocessing.TimeoutError:
            pytest.fail(f"the fork pool worker did not finish within {CHILD_TIMEOUT} s")
        assert got == parent
    finally:
        pool.terminate()
        pool.join()


def test_parent_keeps_its_threads():
    if not _openmp.openmp_enabled():
        pytest.skip("serial build")
    assert not _openmp.forked_serial()
    assert _threads.effective_n_threads(2, work=10**7) == 2


# ----------------------------------------------------------------------------------------------
# (a) request, (b) work, (c) CPUs, (d) OpenMP's limit
# ----------------------------------------------------------------------------------------------

def test_request_validation_and_bounds():
    assert _threads.effective_n_threads(3) == (1 if _openmp.forked_serial() else 3)
    for bad, msg in ((0, r">= 1, got 0"), (-2, r">= 1, got -2"), (4097, r"at most 4096"),
                     (True, r"integer"), (2.0, r"integer.*2\.0"), ("2", r"integer.*'2'")):
        with pytest.raises(InvalidArgumentError, match="n_threads.*" + msg):
            _threads.effective_n_threads(bad)
    assert resolve_threads(np.int64(2)) == 2


def test_work_caps_threads_and_small_inputs_stay_serial():
    g = _threads.GRAIN
    assert _threads.effective_n_threads(4096, work=10**7) == 10**7 // g
    assert _threads.effective_n_threads(64, work=2 * g - 1) == 1
    assert _threads.effective_n_threads(64, work=2 * g) == 2
    assert _threads.effective_n_threads(64, work=10**9, tasks=3) == 3
    assert _threads.effective_n_threads(64, work=0) == 1
    # an explicit request above the CPU count is honoured (oversubscription on purpose) ...
    assert _threads.effective_n_threads(16, work=10**7) == 16
    # ... but never beyond the work's chunks
    assert _threads.effective_n_threads(16, work=5 * g) == 5


def test_default_follows_threadpoolctl_limits():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _openmp.openmp_enabled():
        pytest.skip("serial build: nothing to limit")
    a = _work_array()
    ref = np.asarray(magnitude_mask(a, 0.5, n_threads=1))
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _openmp.max_threads() == 1
        assert _threads.effective_n_threads() == 1
        assert resolve_threads(None) == 1
        assert _threads.effective_n_threads(None, work=10**8) == 1
        assert _openmp.team_size(_threads.effective_n_threads()) == 1
        np.testing.assert_array_equal(np.asarray(magnitude_mask(a, 0.5)), ref)
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert _threads.effective_n_threads() == min(2, _threads.available_cpus())


def test_openmp_team_matches_the_policy():
    nt = _threads.effective_n_threads(2, work=10**7)
    assert _openmp.team_size(nt) == (nt if _openmp.openmp_enabled() else 1)


def _cgroup(tmp_path, v2=None, v1=None):
    root = tmp_path / "cg"
    (root / "cpu").mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2)
    if v1 is not None:
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return str(root)


@pytest.mark.parametrize("v2, v1, expect", [
    ("max 100000\n", None, None),
    ("150000 100000\n", None, 2),
    ("100000 100000\n", None, 1),
    ("50000 100000\n", None, 1),
    ("garbage\n", None, None),
    (None, ("-1\n", "100000\n"), None),
    (None, ("300000\n", "100000\n"), 3),
    (None, ("250000\n", "100000\n"), 3),
    (None, None, None),
])
def test_cgroup_quota(tmp_path, v2, v1, expect):
    assert _threads.cgroup_cpu_quota(_cgroup(tmp_path, v2, v1)) == expect


def test_default_respects_cgroup_quota_and_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(_threads, "CGROUP_ROOT", _cgroup(tmp_path, "100000 100000\n"))
    monkeypatch.setattr(_threads, "_quota", _threads._UNREAD)  # read once per process
    assert _threads.available_cpus() == 1
    assert _threads.effective_n_threads() == 1
    assert _threads.effective_n_threads(4, work=10**7) == (1 if _openmp.forked_serial() else 4)
    monkeypatch.setattr(_threads, "CGROUP_ROOT", _cgroup(tmp_path / "b", "max 100000\n"))
    monkeypatch.setattr(_threads, "_quota", _threads._UNREAD)
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert _threads.available_cpus() == 1
        assert _threads.effective_n_threads() == 1


# ----------------------------------------------------------------------------------------------
# scratch memory: sized by the work, never by the requested thread count
# ----------------------------------------------------------------------------------------------

SCRATCH_LIMIT = 0.05  # of the input's bytes, at any n_threads
N_BIG = 10 * 2**20    # ~10 M float32 elements (40 MiB)


@pytest.fixture(scope="module")
def big():
    return np.random.default_rng(11).standard_normal(N_BIG, dtype=np.float32)


def _scratch_bytes(fn):
    """Peak bytes allocated while fn runs (numpy buffers included: numpy reports them to
    tracemalloc), less the bytes of what it returns."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outs = result if isinstance(result, (list, tuple)) else [result]
    out_bytes = sum(np.asarray(o).nbytes for o in outs if hasattr(o, "shape"))
    return peak - out_bytes


def _cases(a):
    from aprender.pruning import generate_global_mask, generate_unstructured_mask, \
        magnitude_nm_mask, selection

    rows = a.reshape(2560, 4096)
    wide = a.reshape(5, -1)  # a row of 2 M elements: one row's keys alone are 20 % of the input
    parts = [a[:N_BIG // 2], a[N_BIG // 2:N_BIG - 4096], a[N_BIG - 4096:]]
    return {
        "unstructured": lambda nt: generate_unstructured_mask(a, 0.5, n_threads=nt),
        "magnitude": lambda nt: magnitude_mask(rows, 0.3, n_threads=nt),
        "per-row": lambda nt: magnitude_mask(rows, 0.5, per_row=True, n_threads=nt),
        "per-row-wide": lambda nt: magnitude_mask(wide, 0.5, per_row=True, n_threads=nt),
        "global": lambda nt: generate_global_mask(parts, 0.4, n_threads=nt),
        "nm-2:4": lambda nt: magnitude_nm_mask(rows, 2, 4, n_threads=nt),
        "nm-8:16": lambda nt: magnitude_nm_mask(rows, 8, 16, n_threads=nt),
        "nm-axis0": lambda nt: magnitude_nm_mask(rows, 2, 4, axis=0, n_threads=nt),
        "find_threshold": lambda nt: selection.find_threshold([a], [a.size], a.size // 2, 1, 0,
                                                              nt),
    }


@pytest.mark.parametrize("case", ["unstructured", "magnitude", "per-row", "per-row-wide",
                                  "global", "nm-2:4", "nm-8:16", "nm-axis0", "find_threshold"])
@pytest.mark.parametrize("n_threads", [1, 2, 64, 4096])
def test_scratch_is_at_most_5_percent_of_the_input(big, case, n_threads):
    used = _scratch_bytes(lambda: _cases(big)[case](n_threads))
    assert used <= SCRATCH_LIMIT * big.nbytes, (
        f"{case} at n_threads={n_threads}: {used / 2**20:.2f} MiB of scratch, "
        f"{100 * used / big.nbytes:.1f} % of the {big.nbytes / 2**20:.0f} MiB input")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rows_longer_than_the_budget_are_selected_like_tensors(dtype):
    """Per-row selection of rows whose keys alone exceed the scratch budget takes the tensor
    path row by row; the mask is the same (ties included), at every thread count."""
    from aprender import _reference as ref

    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 600_000)).astype(dtype)
    w[1, ::7] = w[1, 3]  # a large tie class in one row
    exp = ref.per_row_mask(w, 0.37, magnitude=True)
    for nt in (1, 2, 4096):
        np.testing.assert_array_equal(np.asarray(magnitude_mask(w, 0.37, per_row=True,
                                                                n_threads=nt)), exp)
    w[2, 12345] = np.nan
    from aprender.errors import NumericalInstabilityError
    with pytest.raises(NumericalInstabilityError, match=r"NaN at index \(2, 12345\)"):
        magnitude_mask(w, 0.37, per_row=True)


@pytest.mark.parametrize("inner", [1, 7, 511, 512, 513, 1300])
def test_nm_along_a_leading_axis_over_column_tiles(inner):
    """The rank counts of N:M along a leading axis live on the stack in tiles of 512 columns."""
    from aprender import _reference as ref
    from aprender.pruning import generate_nm_mask

    rng = np.random.default_rng(inner)
    w = rng.choice(np.array([-1.0, 0.5, 2.0, -3.0, 0.25]), size=(3, 8, inner)).astype(np.float32)
    w[:, :, ::3] = rng.standard_normal((3, 8, len(range(0, inner, 3))))
    for n, m in ((2, 4), (3, 8), (1, 2)):
        for nt in (1, 3):
            np.testing.assert_array_equal(
                np.asarray(generate_nm_mask(w, n, m, axis=1, n_threads=nt)),
                ref.nm_mask(w, n, m, axis=1))


def test_streaming_threshold_handles_a_huge_tie_class():
    """Per-task candidate buffers are sized from the sample's share inside the bracket, ties at
    its ends included: a tie-heavy tensor still takes the sample path."""
    from aprender.pruning import selection

    rng = np.random.default_rng(9)
    x = rng.choice(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), 600_000).astype(np.float32)
    k = 250_001
    t, below, bad, method = selection.find_threshold([x], [x.size], k, 1, 0, 2)
    keys = np.sort(np.abs(x))
    assert method == "sample" and bad == 0
    assert np.float32(keys[k - 1]).view(np.uint32) | 0x80000000 == t
    assert below == np.count_nonzero(np.abs(x) < keys[k - 1])


def test_streaming_candidates_of_a_tensor_denser_than_the_sample_said():
    """A tensor whose keys crowd the threshold overflows the buffers sized from the pooled
    sample; a second pass over that tensor alone copies exactly its candidates (no fallback to
    the radix passes over every tensor), and the threshold is exact."""
    from aprender._kernels import select
    from aprender.pruning import selection

    rng = np.random.default_rng(21)
    a = rng.standard_normal(2_000_000).astype(np.float32)
    med = np.median(np.abs(a))
    b = (med + rng.uniform(-1e-4, 1e-4, 300_000)).astype(np.float32)
    k = (a.size + b.size) // 2
    for nt in (1, 3):
        t, below, bad, method = selection.find_threshold([a, b], [a.size, b.size], k, 1, 0, nt)
        keys = np.sort(np.abs(np.concatenate([a, b])))
        assert (method, bad) == ("sample", 0)
        assert t == int(keys[k - 1].view(np.uint32)) | 2**31
        assert below == np.count_nonzero(keys < keys[k - 1])
    # the pass itself: buffers sized for nothing inside, then the exact second pass
    x = np.abs(rng.standard_normal(300_000)).astype(np.float32)
    lo, hi = np.float32(0.5), np.float32(0.6)
    klo, khi = int(lo.view(np.uint32)) | 2**31, int(hi.view(np.uint32)) | 2**31
    below, inside, bad, cands = select.range_pass(x, klo, khi, 1, 0, 10**6, 4, 0.0)
    want = x[(x >= lo) & (x <= hi)].view(np.uint32) | np.uint32(2**31)
    assert below == np.count_nonzero(x < lo) and inside == want.size and bad == 0
    np.testing.assert_array_equal(cands, want)  # in flat order


def test_cgroup_quota_is_read_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(_threads, "CGROUP_ROOT", _cgroup(tmp_path, "100000 100000\n"))
    monkeypatch.setattr(_threads, "_quota", _threads._UNREAD)
    assert _threads.available_cpus() == 1
    monkeypatch.setattr(_threads, "CGROUP_ROOT", str(tmp_path / "gone"))
    assert _threads.available_cpus() == 1  # cached: no second read
    _threads._forget_quota()  # what a forked child does
    assert _threads.available_cpus() >= 1 and _threads._quota is None
