"""The one thread policy: how many threads a kernel call uses.

``effective_n_threads(n_threads, work, tasks)`` combines

(a) the request: ``None`` means "what this process may use", an int >= 1 is honoured (up to
    MAX_THREADS; more threads than CPUs is allowed: a caller may oversubscribe on purpose);
(b) the work: never more threads than the work has chunks, ``min(tasks, work // GRAIN)``, so
    small inputs stay serial and per-thread scratch is bounded by the input's size;
(c) for ``None``, the CPUs available to the process: its affinity mask
    (``os.sched_getaffinity``) and the cgroup CPU quota (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up), as scikit-learn does;
(d) for ``None``, ``omp_get_max_threads()``: what OMP_NUM_THREADS and
    ``threadpoolctl.threadpool_limits(limits=N, user_api="openmp")`` allow;

and answers 1 in a forked child (GNU OpenMP's thread pool does not survive fork(): in a child of
a process that ran a parallel region, ours or another library's on the same libgomp such as
PyTorch's, the first parallel region would wait forever).

(b) is applied inside each kernel by the same rule (``threads_for`` in
``aprender/_kernels/_openmp.pyx``, one constant ``GRAIN``); the Python layer resolves (a), (c)
and (d) once per call and passes the count down.  Masks never depend on the count.

The same count bounds the other pools aprender drives, through one context manager,
:func:`limit_pools`, around every stretch of BLAS/LAPACK or torch work:

* BLAS/LAPACK (numpy's and SciPy's OpenBLAS, each its own pool, both limited through
  threadpoolctl when it is installed): ``n`` threads for a large matrix product that runs
  alone (the XᵀX update of ActivationStats, the right-hand side of the shrink compensation: no
  OpenMP team of ours or torch's is awake beside it), **1** for everything else:

  - LAPACK factorisations and solves (SparseGPT's potrf/trtri, the compensation's
    potrf/potrs).  OpenBLAS's threaded potrf synchronises its threads at every panel; with a
    busy neighbour on each core, a descheduled thread stalls the other at each step.  Measured
    on 2 cores with a busy loop per core: potrf of a 1024 x 1024 matrix 0.07-0.09 s on one
    thread, 2.5-3.3 s on two (2048: 0.3-0.4 s against 2-9 s), where a matrix product loses
    at most 2x.  On an idle machine the second thread saves less than half.
  - BLAS calls interleaved with OpenMP regions (SparseGPT's block loop, where each block's
    matmul alternates with our column kernel; the XᵀX updates in calibration hooks, between
    torch's forward ops).  An idle OpenBLAS worker busy-waits for a while after each call and
    GNU OpenMP's workers spin after each region: two teams alternating at a fine grain find
    the cores held by each other's spinning threads.  One team at a time, each no larger than
    ``n``, never runs more than ``n`` busy threads.

  Limits nest and only narrow: a product inside an interleaved stretch gets 1 even where it
  alone would get ``n``.  Without threadpoolctl the BLAS pools are left as they are
  (show_config says so).
* torch's intra-op threads (``torch.set_num_threads``) in ``calibrate`` and the torch interop:
  ``n``, restored afterwards (also after an error).  torch's pool is an OpenMP team of its own
  that never runs at the same time as ours (the hooks run between its ops).
"""
import contextlib
import contextvars
import math
import numbers
import operator
import os
import sys



def _openmp_loaded():
    """True when an OpenMP runtime (libgomp, libomp, libiomp) is already mapped into this process
    (e.g. torch was imported first); None where that cannot be told (not Linux)."""
    try:
        with open("/proc/self/maps") as fh:
            return any(("libgomp" in line or "libomp" in line or "libiomp" in line)
                       for line in fh)
    except OSError:
        return None


def _passive_wait_by_default(environ=None):
    """Make OpenMP workers sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or a runtime is
    already loaded (the setting is read once, when the runtime starts; setting it then would
    only surprise child processes).  Returns the policy set, or None.

    Why: GNU OpenMP's default keeps a worker spinning for a while after each parallel region
    and at each barrier.  On an idle machine that saves a wake-up of some microseconds; on a
    busy one the spinning thread holds a core the neighbour, or a descheduled team mate that
    the barrier waits for, needs.  Measured on 2 cores with a busy loop per core: ``aprender
    prune --importance sparsegpt`` of a small Llama 10.6 s with two threads against 2.0 s with
    one; passive, 2.3 s against 2.3 s.  Our regions are coarse (at least 32,768 elements a
    thread), so a wake-up costs nothing measurable."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    if _openmp_loaded():
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


_passive_wait_by_default()  # before our kernels load libgomp

from ._kernels import _openmp  # noqa: E402
from .errors import InvalidArgumentError  # noqa: E402

__all__ = ["effective_n_threads", "available_cpus", "cgroup_cpu_quota", "limit_pools",
           "blas_bounded", "GRAIN", "MAX_THREADS"]

MAX_THREADS = 4096  # more than any machine has; a larger request is surely a mistake
GRAIN = _openmp.GRAIN  # elements per thread at least (the serial threshold is 2 * GRAIN)
CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path):
    try:
        with open(path) as fh:
            return fh.read().split()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_quota(root=None):
    """CPUs the cgroup CPU quota allows, ceil(quota / period), or None without a quota."""
    root = CGROUP_ROOT if root is None else root
    fields = _read(os.path.join(root, "cpu.max"))  # cgroup v2: "max 100000" or "150000 100000"
    if fields is None:
        q = _read(os.path.join(root, "cpu", "cpu.cfs_quota_us"))  # cgroup v1: -1 = no quota
        p = _read(os.path.join(root, "cpu", "cpu.cfs_period_us"))
        if q is None or p is None:
            return None
        fields = q[:1] + p[:1]
    if len(fields) < 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


_UNREAD = object()
_quota = _UNREAD  # the cgroup quota, read once per process (a file read costs ~40 us a call)


def _forget_quota():
    global _quota
    _quota = _UNREAD


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_quota)


def available_cpus():
    """CPUs this process may run on: the affinity mask (asked each time: it is one system
    call and may change), then the cgroup quota (read once per process)."""
    global _quota
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    if _quota is _UNREAD:
        _quota = cgroup_cpu_quota()
    quota = _quota
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def _requested(n_threads):
    if isinstance(n_threads, (bool,)) or not isinstance(n_threads, numbers.Integral):
        raise InvalidArgumentError(f"n_threads must be an integer or None, got "
                                   f"{type(n_threads).__name__} {n_threads!r}")
    n = operator.index(n_threads)
    if n < 1:
        raise InvalidArgumentError(f"n_threads must be >= 1, got {n}")
    if n > MAX_THREADS:
        shown = n if n < 10 ** 19 else f"an integer of {n.bit_length()} bits"  # str() caps
        raise InvalidArgumentError(f"n_threads must be at most {MAX_THREADS}, got {shown}")
    return n


def effective_n_threads(n_threads=None, work=None, tasks=None):
    """Threads a kernel uses: the request (None: the minimum of omp_get_max_threads() and the
    available CPUs), 1 in a forked child, and when ``work`` (elements)
    is given never more than ``min(tasks, work // GRAIN)`` (tasks defaults to unbounded)."""
    if n_threads is None:
        n = max(1, min(_openmp.max_threads(), available_cpus()))
    else:
        n = _requested(n_threads)
    if _openmp.forked_serial():
        return 1
    if work is not None:
        work = operator.index(work)
        tasks = work if tasks is None else operator.index(tasks)
        n = _openmp.work_threads(n, work, tasks)
    return n


# -- the other pools: BLAS/LAPACK and torch ------------------------------------------------
_blas_cap = contextvars.ContextVar("aprender_blas_cap", default=None)  # innermost BLAS limit


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def blas_bounded():
    """True when limit_pools can bound the BLAS/LAPACK pools (threadpoolctl is installed)."""
    return _threadpoolctl() is not None


@contextlib.contextmanager
def limit_pools(n_threads, *, serial_blas=False, torch=False):
    """Bound every pool aprender drives for the duration of the ``with`` block.

    ``n_threads``: the resolved count (``effective_n_threads``) or None (resolved here).
    BLAS/LAPACK pools get ``n`` threads, or 1 with ``serial_blas=True`` (LAPACK
    factorisations, and BLAS calls that alternate with OpenMP regions, ours or torch's; see
    the module documentation for why), never more than an enclosing limit_pools gave them.
    ``torch=True`` also sets torch's intra-op threads to ``n`` when torch is imported.
    Everything is restored on exit, also after an error."""
    n = effective_n_threads(n_threads) if n_threads is None else _requested(n_threads)
    blas = 1 if serial_blas else n
    outer = _blas_cap.get()
    if outer is not None:
        blas = min(blas, outer)
    token = _blas_cap.set(blas)
    tp = _threadpoolctl()
    torch_mod = sys.modules.get("torch") if torch else None
    before = None
    try:
        with contextlib.ExitStack() as stack:
            if tp is not None and blas != outer:  # an enclosing limit already set this count
                stack.enter_context(tp.threadpool_limits(limits=blas, user_api="blas"))
            if torch_mod is not None:
                before = torch_mod.get_num_threads()
                if before != n:
                    torch_mod.set_num_threads(n)
                    stack.callback(torch_mod.set_num_threads, before)
            yield n
    finally:
        _blas_cap.reset(token)
