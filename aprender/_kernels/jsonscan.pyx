"""A structural pre-scan of untrusted JSON bytes, run before ``json.loads``.

``json.loads`` builds every list and dict before anything can be checked: a hostile
safetensors header of 100 MB holding one ten-million-element "shape" list, or thousands of
nested brackets, costs gigabytes or a RecursionError before the first validation runs.  This
pass reads the bytes once, allocating nothing, and reports the first place where the nesting
depth, an array's element count or a run of digits goes past the caller's limit.  Syntax
errors are not its business (``json.loads`` reports those); it only has to be exact about
strings, so that brackets, commas and digits inside strings are never counted.
"""
from libc.stdint cimport uint8_t

from ._guard import guard
from ..errors import InvalidArgumentError

cdef enum:
    MAX_STACK = 256

# status codes (returned with the offending byte offset)
OK = 0
TOO_DEEP = 1
ARRAY_TOO_LONG = 2
NUMBER_TOO_LONG = 3
OBJECT_TOO_LONG = 4


def scan(const uint8_t[::1] buf not None, Py_ssize_t max_depth, Py_ssize_t max_array,
         Py_ssize_t max_digits, Py_ssize_t max_members):
    """(status, offset): status 0 when the bytes stay within the limits, else TOO_DEEP,
    ARRAY_TOO_LONG, NUMBER_TOO_LONG or OBJECT_TOO_LONG with the byte offset where the limit
    was passed.  ``max_members`` bounds the members of every object below the top level."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t i = 0, depth = 0, digits = 0
    cdef uint8_t c
    cdef bint in_string = False, escaped = False
    cdef int status = 0
    cdef uint8_t is_array[MAX_STACK]
    cdef Py_ssize_t count[MAX_STACK]
    if max_depth < 0 or max_array < 0 or max_digits < 0 or max_members < 0:
        raise InvalidArgumentError(f"scan limits must be >= 0, got depth {max_depth}, array "
                                   f"{max_array}, digits {max_digits}, members {max_members}")
    if max_depth > MAX_STACK - 1:
        max_depth = MAX_STACK - 1
    with nogil:
        while i < n:
            c = buf[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == 92:  # backslash
                    escaped = True
                elif c == 34:  # quote
                    in_string = False
            elif c == 34:
                in_string = True
                digits = 0
            elif c >= 48 and c <= 57:  # digit
                digits += 1
                if digits > max_digits:
                    status = 3
                    break
            else:
                digits = 0
                if c == 91 or c == 123:  # [ {
                    depth += 1
                    if depth > max_depth:
                        status = 1
                        break
                    is_array[depth] = (c == 91)
                    count[depth] = 1
                elif c == 93 or c == 125:  # ] }
                    if depth > 0:
                        depth -= 1
                elif c == 44:  # ,
                    if depth > 0:
                        count[depth] += 1
                        if is_array[depth] and count[depth] > max_array:
                            status = 2
                            break
                        if not is_array[depth] and depth > 1 and count[depth] > max_members:
                            status = 4
                            break
            i += 1
    return status, i


guard(globals(), ["scan"])
