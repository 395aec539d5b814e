"""Shared checks of the hostile-input catalogues (tests/test_attacks_*.py): one attack, one
typed error or one line from the command line."""
import re

import pytest

from aprender.cli import main
from aprender.errors import PruningError


def check_error(case):
    """``case`` = (id, call, exact error type, builtin it must also be, message regex): the call
    raises exactly that type, which is also the builtin, with a matching one-line message short
    enough that hostile input is never echoed whole."""
    _, fn, exc_type, builtin, regex = case
    with pytest.raises(PruningError) as info:
        fn()
    err = info.value
    assert type(err) is exc_type, f"expected exactly {exc_type.__name__}, got {type(err).__name__}"
    assert isinstance(err, builtin), f"{type(err).__name__} is not a {builtin.__name__}"
    message = str(err)
    assert re.search(regex, message), f"message {message!r} does not match {regex!r}"
    assert len(message) < 600 and "\n" not in message, "hostile input must not be echoed whole"


def cli(args, capsys):
    """(exit code, stderr) of ``aprender ARGS`` run in-process; a failure is one line of stderr,
    no traceback, no temporary path."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    if code:
        assert len(err.splitlines()) == 1, err
        assert "Traceback" not in err and ".aprender-tmp" not in err, err
    return code, err
