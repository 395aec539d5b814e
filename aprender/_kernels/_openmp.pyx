"""What the kernels were built with, how many threads OpenMP offers, and the kernel side of the
thread policy (threads_for, cimported by every kernel module; see _openmp.pxd).

Fork safety: GNU OpenMP keeps its worker threads in a pool that a forked child does not have, so
the first parallel region in a child of a process that ran one waits forever.  The region may
have been anyone's (PyTorch, for one, shares libgomp with us), so a pthread_atfork handler marks
every forked child, and threads_for then answers 1 there (serial), whatever was asked.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int apr_openmp_built(void) { return 1; }
    static int apr_openmp_max_threads(void) { return omp_get_max_threads(); }
    static int apr_openmp_team(int n) {
        int team = 1;
        #pragma omp parallel num_threads(n)
        {
            if (omp_get_thread_num() == 0) team = omp_get_num_threads();
        }
        return team;
    }
    #else
    static int apr_openmp_built(void) { return 0; }
    static int apr_openmp_max_threads(void) { return 1; }
    static int apr_openmp_team(int n) { (void)n; return 1; }
    #endif

    /* apr_forked_serial: this process is a forked child; if its parent ran a parallel region
     * (ours or another library's on the same libgomp) OpenMP's thread pool is gone. */
    static volatile int apr_forked_serial = 0;
    #if defined(_WIN32)
    static int apr_register_atfork(void) { return 0; }
    #else
    #include <pthread.h>
    static void apr_atfork_child(void) { apr_forked_serial = 1; }
    static int apr_register_atfork(void) { return pthread_atfork(NULL, NULL, apr_atfork_child); }
    #endif
    """
    int apr_openmp_built() nogil
    int apr_openmp_max_threads() nogil
    int apr_openmp_team(int n) nogil
    int apr_forked_serial
    int apr_register_atfork()

from ._guard import guard

if apr_register_atfork() != 0:  # pragma: no cover - pthread_atfork only fails without memory
    raise ImportError("aprender: pthread_atfork failed; cannot make the kernels fork-safe")

GRAIN = PARALLEL_GRAIN


cdef int threads_for(int n_threads, Py_ssize_t n_items, Py_ssize_t n_tasks) noexcept nogil:
    """Threads for a kernel over n_items elements split into n_tasks independent tasks, given
    the count the Python layer resolved: min(n_threads, n_tasks, n_items // PARALLEL_GRAIN),
    at least 1; always 1 in a forked child."""
    cdef Py_ssize_t chunks = n_items // PARALLEL_GRAIN
    if n_tasks < chunks:
        chunks = n_tasks
    if n_threads <= 1 or chunks <= 1 or apr_forked_serial:
        return 1
    return <int>(n_threads if n_threads < chunks else chunks)


def openmp_enabled():
    """True when the extensions were compiled with OpenMP."""
    return bool(apr_openmp_built())


def max_threads():
    """omp_get_max_threads(): what OMP_NUM_THREADS and threadpoolctl limits allow (1 serial)."""
    return int(apr_openmp_max_threads())


def forked_serial():
    """True in a forked child (its kernels run on one thread: see the module docstring)."""
    return bool(apr_forked_serial)


def work_threads(int n_threads, Py_ssize_t n_items, Py_ssize_t n_tasks):
    """threads_for from Python: the threads a kernel uses for this much work."""
    if n_threads < 1:
        from ..errors import InvalidArgumentError
        raise InvalidArgumentError(f"n_threads must be >= 1, got {n_threads}")
    if n_items < 0 or n_tasks < 0:
        from ..errors import InvalidArgumentError
        raise InvalidArgumentError(f"work must be >= 0, got n_items={n_items}, n_tasks={n_tasks}")
    return threads_for(n_threads, n_items, n_tasks)


def team_size(int n_threads):
    """How many threads OpenMP really starts for a parallel region asking for n_threads after
    the policy for a large input (what a kernel's prange gets); for tests and show_config."""
    if n_threads < 1:
        from ..errors import InvalidArgumentError
        raise InvalidArgumentError(f"n_threads must be >= 1, got {n_threads}")
    cdef int nt = threads_for(n_threads, <Py_ssize_t>n_threads * PARALLEL_GRAIN, n_threads)
    cdef int team
    with nogil:
        team = apr_openmp_team(nt)
    return int(team)


guard(globals(), ["work_threads", "team_size"])
