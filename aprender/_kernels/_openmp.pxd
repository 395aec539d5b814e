# The kernel side of the one thread policy (aprender/_threads.py holds the Python side).
#
# Every parallel kernel calls threads_for() once with the count the Python layer resolved
# (aprender._threads.effective_n_threads) and the size of its work, and passes the result to
# every prange(..., num_threads=...) and sizes any per-thread scratch by it.

cdef enum:
    # A thread gets at least this many elements: smaller inputs stay serial, and the number of
    # threads (and so of per-thread scratch slots) never exceeds n_items // PARALLEL_GRAIN.
    PARALLEL_GRAIN = 32768

cdef int threads_for(int n_threads, Py_ssize_t n_items, Py_ssize_t n_tasks) noexcept nogil
