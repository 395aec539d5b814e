"""Typed errors for the kernels' Python entry points.

Each kernel wrapper checks the sizes of the buffers it receives and raises aprender's typed
errors itself.  Before its body runs, though, Cython converts the arguments, and those failures
are plain built-in exceptions: a buffer of the wrong dtype, number of dimensions or layout
(ValueError), ``None`` where a buffer is needed or no fused specialisation for the dtypes
(TypeError), an integer too large for its C type (OverflowError).  ``guard`` wraps a module's
entry points so that these come out as typed errors too (InvalidDTypeError, InvalidShapeError
or InvalidArgumentError, naming the function), with the original exception chained.
"""
import functools
import inspect

from ..errors import InvalidArgumentError, InvalidDTypeError, InvalidShapeError, PruningError


def _describe(value):
    if value is None:
        return "None"
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return type(value).__name__
    flags = getattr(value, "flags", None)
    notes = ""
    if flags is not None and not flags.c_contiguous:
        notes += ", not C-contiguous"
    if flags is not None and not flags.writeable:
        notes += ", read-only"
    return f"{dtype} array of shape {tuple(shape)}{notes}"


def _arguments(fn, args, kwargs):
    """'name: description' of the buffer (and None) arguments of a call."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {f"argument {i}": v for i, v in enumerate(args)}
        bound.update(kwargs)
    return ", ".join(f"{k}: {_describe(v)}" for k, v in bound.items()
                     if v is None or hasattr(v, "shape"))


def _typed(name, exc, fn=None, args=(), kwargs=None):
    text = str(exc)
    low = text.lower()
    if "no matching signature" in low or "ambiguous argument types" in low:
        # a fused kernel found no specialisation: say what it was given
        given = _arguments(fn, args, kwargs or {}) if fn is not None else ""
        cls = InvalidArgumentError if "None" in given else InvalidDTypeError
        return cls(f"{name}: no kernel takes these buffers (wrong dtype, number of dimensions "
                   f"or None): {given}")
    if "dimension" in low:
        cls = InvalidShapeError
    elif "dtype" in low or "signature" in low or "incorrect type" in low or "itemsize" in low:
        cls = InvalidDTypeError
    else:
        cls = InvalidArgumentError
    if isinstance(exc, OverflowError):
        text = f"an integer argument is out of range ({text})"
    return cls(f"{name}: {text}")


def guard(namespace, names):
    """Replace namespace[name] for each name by a wrapper that turns argument-conversion errors
    (ValueError, TypeError, OverflowError, BufferError that are not already PruningErrors) into
    typed errors."""
    for name in names:
        fn = namespace[name]

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            try:
                return _fn(*args, **kwargs)
            except PruningError:
                raise
            except (ValueError, TypeError, OverflowError, BufferError) as exc:
                raise _typed(_name, exc, _fn, args, kwargs) from exc

        namespace[name] = wrapper
