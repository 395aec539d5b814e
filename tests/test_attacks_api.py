"""Hostile and malformed inputs to the object API (aprender.pruning, aprender.nn) and the torch
interop, each reproduced once and kept fixed.

Every case is (id, callable, exact exception type, built-in base, message regex): the error must
be that PruningError subclass, must also be the built-in exception a caller would catch
(ValueError or TypeError), and its message must name the offending value, shape or tensor.
No case may escape as a bare OverflowError, IndexError, ValueError or TypeError.
"""
import fractions
import re

import numpy as np
import pytest

from aprender.pruning import (InvalidArgumentError, InvalidCalibrationError, MagnitudeImportance,
                              PruningError)

ONES = np.ones((2, 4), np.float32)


def _scores(calibration):
    return MagnitudeImportance.l1().compute(ONES, calibration=calibration)


# id, callable, expected type, built-in base, regex the message must match
CASES = [
    # --- MagnitudeImportance(p): numbers a float cannot hold -----------------------------------
    ("p-huge-int", lambda: MagnitudeImportance(10 ** 400),
     InvalidArgumentError, ValueError, r"p.*too large.*10000"),
    ("p-huge-fraction", lambda: MagnitudeImportance(fractions.Fraction(10 ** 400, 3)),
     InvalidArgumentError, ValueError, r"p.*Fraction"),
    ("p-numpy-bool", lambda: MagnitudeImportance(np.bool_(True)),
     InvalidArgumentError, ValueError, r"p.*bool.*True"),
    ("p-none", lambda: MagnitudeImportance(None), InvalidArgumentError, ValueError, r"p.*None"),
    ("p-array", lambda: MagnitudeImportance(np.array([1.0, 2.0])),
     InvalidArgumentError, ValueError, r"p.*ndarray"),
    ("p-numpy-nan", lambda: MagnitudeImportance(np.float64("nan")),
     InvalidArgumentError, ValueError, r"finite.*nan"),
    # --- calibration= : None or calibration data, nothing else ---------------------------------
    ("calibration-string", lambda: _scores("wikitext"),
     InvalidCalibrationError, TypeError, r"CalibrationContext.*str 'wikitext'"),
    ("calibration-array", lambda: _scores(np.ones(3)),
     InvalidCalibrationError, TypeError, r"CalibrationContext.*numpy\.ndarray"),
    ("calibration-dict", lambda: _scores({"layer": np.ones(4)}),
     InvalidCalibrationError, TypeError, r"CalibrationContext.*dict"),
    ("calibration-int", lambda: _scores(0), InvalidCalibrationError, TypeError, r"got int 0"),
    ("calibration-half-interface", lambda: _scores(type("C", (), {"layer_names": ["a"]})()),
     InvalidCalibrationError, TypeError, r"CalibrationContext.*C"),
]


def _check(case):
    _, fn, exc_type, builtin, regex = case
    with pytest.raises(PruningError) as info:
        fn()
    err = info.value
    assert type(err) is exc_type, f"expected exactly {exc_type.__name__}, got {type(err).__name__}"
    assert isinstance(err, builtin), f"{type(err).__name__} is not a {builtin.__name__}"
    message = str(err)
    assert re.search(regex, message), f"message {message!r} does not match {regex!r}"
    assert len(message) < 600, "a message about hostile input must not echo all of it"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_attack(case):
    _check(case)


def test_catalogue_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_calibration_accepts_none_and_calibration_data():
    """None passes; so does anything with the CalibrationContext interface (the class itself
    arrives with the calibration work, and must pass without changing importance.py)."""

    class FakeContext:
        layer_names = ("0",)

        def get_stats(self, name):
            return None

    assert _scores(None).values.shape == ONES.shape
    assert _scores(FakeContext()).values.shape == ONES.shape


def test_calibration_class_is_looked_up_lazily(monkeypatch):
    import aprender.pruning as pruning

    class CalibrationContext:  # no duck-typed interface: accepted because of its class only
        pass

    monkeypatch.setattr(pruning, "CalibrationContext", CalibrationContext, raising=False)
    assert _scores(CalibrationContext()).method == "magnitude_l1"
    with pytest.raises(InvalidCalibrationError):
        _scores(object())

