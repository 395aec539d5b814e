"""Edit members of a JSON document in its own text: the values named are replaced (or a member
inserted after another), every other byte (order, spacing, number spelling, unknown keys) stays
as it was.  Used for ``config.json``, which other tools read field by field: re-serialising it
through a library would add, drop or respell fields.

The text must already have passed :func:`aprender.io.strictjson.loads` (valid, bounded JSON);
the scanner here only finds where values begin and end.
"""
import json

__all__ = ["edit_members"]

_WS = " \t\r\n"


def _skip_ws(s, i):
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s, i):
    """Index after the string starting at s[i] == '"'."""
    i += 1
    while True:
        c = s[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            i += 1


def _value_end(s, i):
    """Index after the value starting at s[i] (no leading whitespace)."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "[{":
        close = "]" if c == "[" else "}"
        i = _skip_ws(s, i + 1)
        if s[i] == close:
            return i + 1
        while True:
            if c == "{":
                i = _skip_ws(s, _string_end(s, i))
                i = _skip_ws(s, i + 1)  # the ':'
            i = _skip_ws(s, _value_end(s, i))
            if s[i] == close:
                return i + 1
            i = _skip_ws(s, i + 1)  # the ','
    while i < len(s) and s[i] not in _WS + ",]}":
        i += 1
    return i


def _members(s, i):
    """{key: (key_start, value_start, value_end)} of the object starting at s[i] == '{'."""
    out = {}
    i = _skip_ws(s, i + 1)
    if s[i] == "}":
        return out
    while True:
        k0 = i
        k1 = _string_end(s, i)
        key = json.loads(s[k0:k1])
        i = _skip_ws(s, k1)
        v0 = _skip_ws(s, i + 1)
        v1 = _value_end(s, v0)
        out[key] = (k0, v0, v1)
        i = _skip_ws(s, v1)
        if s[i] == "}":
            return out
        i = _skip_ws(s, i + 1)


def _line_indent(s, pos):
    start = s.rfind("\n", 0, pos) + 1
    j = start
    while j < pos and s[j] in " \t":
        j += 1
    return s[start:j]


def _render(value, old, s, key_start):
    """``value`` as JSON text in the style of the value it replaces: a list that was written
    one element per line stays so, at the same indentation."""
    if isinstance(value, list) and "\n" in old and value:
        inner = old[1:].lstrip(" \t")
        first = old[1:len(old) - len(inner)]  # the whitespace before the first element
        indent = first.rsplit("\n", 1)[-1] if "\n" in first else _line_indent(s, key_start) + "  "
        items = [json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(indent + t for t in items) + "\n" + _line_indent(s, key_start) \
            + "]"
    return json.dumps(value, ensure_ascii=False)


def edit_members(text, path, changes, inserts=()):
    """``text`` with the members of the object at ``path`` (a tuple of keys from the top-level
    object; ``()`` is the top level) changed: ``changes`` maps existing keys to their new
    values; ``inserts`` is a list of ``(after_key, key, value)`` adding ``key`` right after
    the existing member ``after_key`` (on its own line when members are one per line)."""
    top = _skip_ws(text, 0)
    start = top
    for key in path:
        start = _members(text, start)[key][1]
    members = _members(text, start)
    edits = []  # (start, end, replacement)
    for key, value in changes.items():
        k0, v0, v1 = members[key]
        edits.append((v0, v1, _render(value, text[v0:v1], text, k0)))
    for after, key, value in inserts:
        k0, v0, v1 = members[after]
        between = text[text.rfind("\n", 0, k0):k0] if "\n" in text[start:k0] else " "
        edits.append((v1, v1, "," + between + json.dumps(key) + ": "
                      + json.dumps(value, ensure_ascii=False)))
    for a, b, new in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:a] + new + text[b:]
    return text
