"""JSON from untrusted files, as strict as the formats that use it.

The standard ``json`` module accepts what safetensors headers, index files and configs must not
hold, and fails on some inputs with the wrong exception: it silently keeps the last of two
duplicate keys, turns ``1e400`` into ``inf`` and accepts ``NaN``/``Infinity``, raises
``ValueError`` on integers of thousands of digits, ``RecursionError`` on deep nesting, and
builds every list before anything can be checked.  :func:`loads` runs a structural pre-scan
(depth, array length, digit runs: no allocation) and then decodes with hooks that refuse
duplicate keys, non-finite constants and lone surrogates.  Every failure is a
:class:`~aprender.errors.CheckpointError` naming ``what`` and the problem.
"""
import json

import numpy as np

from ..errors import CheckpointError

__all__ = ["loads", "Limits", "HEADER_LIMITS", "DOCUMENT_LIMITS", "check_text"]


class Limits:
    """Structural limits: nesting depth, elements of one array, digits of one number, and
    whether numbers with a fraction or exponent are allowed at all."""

    __slots__ = ("depth", "array", "digits", "floats", "members")

    def __init__(self, depth, array, digits, floats, members):
        self.depth, self.array, self.digits, self.floats = depth, array, digits, floats
        self.members = members


# A safetensors header: {name: {"dtype", "shape": [...], "data_offsets": [a, b]}} plus a flat
# str -> str "__metadata__": three levels, arrays of at most 64 dimensions, integers that fit
# in 64 bits (20 digits), no floating-point numbers anywhere; below the top level (tensor
# entries, metadata) at most 4096 members per object, so a header's memory after parsing stays
# within about ten times its size (a flood of tiny metadata pairs would cost twenty).
HEADER_LIMITS = Limits(depth=3, array=64, digits=20, floats=False, members=4096)
# index files and config.json: free-form, but not hostile-deep or hostile-long numbers
DOCUMENT_LIMITS = Limits(depth=64, array=1 << 24, digits=40, floats=True, members=1 << 24)

_STATUS = {1: "nested deeper than {} levels", 2: "an array longer than {} elements",
           3: "a number longer than {} digits", 4: "an object with more than {} members"}


def check_text(text, what):
    """Refuse strings that cannot be valid UTF-8 (JSON's lone-surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what}: string {text!r} holds a lone surrogate (not valid "
                              "UTF-8)") from None
    return text


def _pairs(what):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            check_text(k, what)
            if k in out:
                raise CheckpointError(f"{what}: duplicate key {k!r}")
            out[k] = v
        return out
    return hook


def _no_constant(what):
    def hook(name):
        raise CheckpointError(f"{what}: {name} is not a JSON number")
    return hook


def _float(what, limits):
    def hook(text):
        if not limits.floats:
            raise CheckpointError(f"{what}: {text} where an integer is required")
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise CheckpointError(f"{what}: number {text} is out of range")
        return value
    return hook


def loads(raw, what, limits=DOCUMENT_LIMITS):
    """Decode ``raw`` (bytes) under ``limits``; ``what`` names the source in errors."""
    buf = np.frombuffer(raw, np.uint8) if len(raw) else np.zeros(0, np.uint8)
    from .._kernels import jsonscan

    status, offset = jsonscan.scan(buf, limits.depth, limits.array, limits.digits,
                                   limits.members)
    if status:
        limit = {1: limits.depth, 2: limits.array, 3: limits.digits, 4: limits.members}[status]
        raise CheckpointError(f"{what}: {_STATUS[status].format(limit)} at byte {offset}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    del buf
    try:
        value = json.loads(text, object_pairs_hook=_pairs(what),
                           parse_constant=_no_constant(what), parse_float=_float(what, limits))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                              f"{exc.colno})") from None
    except RecursionError:  # only reachable with limits deeper than the interpreter allows
        raise CheckpointError(f"{what}: nested too deeply") from None
    _check_strings(value, what)
    return value


def _check_strings(value, what):
    """Lone surrogates in string values (keys are checked by the pairs hook)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            check_text(v, what)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
