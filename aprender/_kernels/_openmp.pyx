"""What the kernels were built with, and how many threads they will use."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int apr_openmp_built(void) { return 1; }
    static int apr_openmp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int apr_openmp_built(void) { return 0; }
    static int apr_openmp_max_threads(void) { return 1; }
    #endif
    """
    int apr_openmp_built() nogil
    int apr_openmp_max_threads() nogil


def openmp_enabled():
    """True when the extensions were compiled with OpenMP."""
    return bool(apr_openmp_built())


def max_threads():
    """Threads a parallel region will use by default (OMP_NUM_THREADS, threadpoolctl limits)."""
    return int(apr_openmp_max_threads())
