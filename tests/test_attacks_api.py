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

from aprender.nn import Linear, Sequential
from aprender.pruning import (InvalidArgumentError, InvalidCalibrationError, InvalidDTypeError,
                              InvalidPatternError, InvalidShapeError, InvalidSparsityError,
                              MagnitudeImportance, PruningError, ShapeMismatchError,
                              SparsityMask, SparsityPattern,
                              generate_nm_mask, generate_unstructured_mask, magnitude_mask)
from catalogue import check_error  # noqa: E402

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
    # --- SparsityMask: input numpy cannot make an array of ------------------------------------
    ("mask-ragged", lambda: SparsityMask([[1, 0], [0]]),
     InvalidDTypeError, TypeError, r"mask.*list.*inhomogeneous"),
    ("mask-ragged-pattern-check", lambda: SparsityPattern.nm(2, 4).validate([[1, 0, 1, 0], [1]]),
     InvalidDTypeError, TypeError, r"mask.*list"),
    ("mask-pattern-huge-string", lambda: SparsityMask(np.ones(4, bool), "2:4" * 10 ** 5),
     InvalidPatternError, ValueError, r"SparsityPattern.*'2:42:4"),
    # --- SparsityPattern.parse: only ASCII digits, bounded text --------------------------------
    ("parse-superscript-digit", lambda: SparsityPattern.parse("\u00b2:4"),
     InvalidPatternError, ValueError, r"invalid pattern '\u00b2:4'"),
    ("parse-fullwidth-digits", lambda: SparsityPattern.parse("\uff12:\uff14"),
     InvalidPatternError, ValueError, r"invalid pattern '\uff12:\uff14'"),
    ("parse-arabic-indic-digits", lambda: SparsityPattern.parse("\u0662:\u0664"),
     InvalidPatternError, ValueError, r"invalid pattern"),
    ("parse-block-superscript", lambda: SparsityPattern.parse("block:\u00b2x2"),
     InvalidPatternError, ValueError, r"block:4x4.*'block:\u00b2x2'"),
    ("parse-block-underscore", lambda: SparsityPattern.parse("block:4_0x4"),
     InvalidPatternError, ValueError, r"'block:4_0x4'"),
    ("parse-block-plus", lambda: SparsityPattern.parse("block:+4x4"),
     InvalidPatternError, ValueError, r"'block:\+4x4'"),
    ("parse-5000-digits", lambda: SparsityPattern.parse("1" * 5000 + ":4"),
     InvalidPatternError, ValueError, r"invalid pattern '1111.*5002 characters"),
    ("parse-huge-n", lambda: SparsityPattern.parse("9" * 30 + ":4"),
     InvalidPatternError, ValueError, r"N <= M.*9{30}:4"),
    ("parse-huge-m", lambda: SparsityPattern.parse("2:" + "9" * 30),
     InvalidPatternError, ValueError, r"1024.*9{30}"),
    ("parse-nul", lambda: SparsityPattern.parse("2:4\x00"),
     InvalidPatternError, ValueError, r"'2:4\\x00'"),
    ("parse-bytes", lambda: SparsityPattern.parse(b"2:4"),
     InvalidPatternError, ValueError, r"string.*bytes b'2:4'"),
    ("parse-none", lambda: SparsityPattern.parse(None),
     InvalidPatternError, ValueError, r"string.*None"),
    ("parse-per-row-typo", lambda: SparsityPattern.parse("perrow"),
     InvalidPatternError, ValueError, r"'perrow'.*'per-row'"),
    # --- SparsityPattern construction and use ---------------------------------------------------
    ("count-groups-block-not-tiling",
     lambda: SparsityPattern.block_pattern(3, 3).count_groups(np.ones((4, 4))),
     InvalidPatternError, ValueError, r"\(3, 3\).*\(4, 4\)"),
    ("count-groups-nm-not-dividing", lambda: SparsityPattern.nm(2, 4).count_groups(np.ones(6)),
     InvalidPatternError, ValueError, r"\(6,\).*M=4"),
    ("count-groups-0d", lambda: SparsityPattern.rows().count_groups(np.array(True)),
     InvalidShapeError, ValueError, r"0-d"),
    ("count-groups-huge-block",
     lambda: SparsityPattern.block_pattern(10 ** 30, 1).count_groups(np.ones((2, 2))),
     InvalidPatternError, ValueError, r"1000000000000000000000000000000, 1"),
    ("pattern-kind-array", lambda: SparsityPattern(np.array(["nm", "row"])),
     InvalidPatternError, ValueError, r"unknown sparsity pattern array"),
    ("pattern-kind-none", lambda: SparsityPattern(None),
     InvalidPatternError, ValueError, r"unknown sparsity pattern None"),
    ("pattern-axis-string", lambda: SparsityPattern.nm(2, 4, axis="0"),
     InvalidShapeError, ValueError, r"axis.*integer.*'0'"),
    ("pattern-axis-bool", lambda: SparsityPattern.nm(2, 4, axis=True),
     InvalidShapeError, ValueError, r"axis.*True"),
    ("pattern-axis-not-nm", lambda: SparsityPattern("row", axis=0),
     InvalidPatternError, ValueError, r"axis=0.*N:M.*'row'"),
    ("pattern-axis-huge", lambda: SparsityPattern.nm(2, 4, axis=10 ** 30).validate(np.ones(4)),
     InvalidShapeError, ValueError, r"axis 10{30} is out of range"),
    ("pattern-block-huge-float", lambda: SparsityPattern.block_pattern(1e300, 2),
     InvalidPatternError, ValueError, r"block size.*integer.*1e\+300"),
    ("pattern-nm-numpy-bool", lambda: SparsityPattern.nm(np.bool_(True), 4),
     InvalidPatternError, ValueError, r"integer n.*True"),
    ("resolve-contradicting-sparsity", lambda: SparsityPattern.nm(2, 4).resolve_sparsity(0.75),
     InvalidSparsityError, ValueError, r"0\.75.*2:4"),
    ("resolve-nan-sparsity", lambda: SparsityPattern.per_row().resolve_sparsity(float("nan")),
     InvalidSparsityError, ValueError, r"sparsity.*nan"),
    # --- generate_* arguments -----------------------------------------------------------------
    ("per-row-array", lambda: magnitude_mask(ONES, 0.5, per_row=np.array([True, False])),
     InvalidArgumentError, ValueError, r"per_row.*True or False.*ndarray"),
    ("per-row-string", lambda: generate_unstructured_mask(ONES, 0.5, per_row="no"),
     InvalidArgumentError, ValueError, r"per_row.*str 'no'"),
    ("sparsity-huge-int", lambda: magnitude_mask(ONES, 10 ** 400),
     InvalidSparsityError, ValueError, r"sparsity.*too large.*1000"),
    ("sparsity-huge-fraction", lambda: magnitude_mask(ONES, fractions.Fraction(10 ** 400, 7)),
     InvalidSparsityError, ValueError, r"sparsity.*Fraction"),
    ("sparsity-numpy-nan", lambda: magnitude_mask(ONES, np.float32("nan")),
     InvalidSparsityError, ValueError, r"sparsity.*\[0, 1\].*nan"),
    ("sparsity-long-string", lambda: magnitude_mask(ONES, "0" * 10 ** 6),
     InvalidSparsityError, ValueError, r"sparsity.*str '000"),
    ("nm-axis-huge", lambda: generate_nm_mask(ONES, 2, 4, axis=10 ** 400),
     InvalidShapeError, ValueError, r"axis 1000.*out of range"),
    # --- aprender.nn --------------------------------------------------------------------------
    ("linear-0d-input", lambda: Linear(4, 2, seed=0)(np.float32(1)),
     ShapeMismatchError, ValueError, r"last dimension 4.*shape \(\)"),
    ("linear-python-scalar-input", lambda: Linear(4, 2, seed=0)(1.0),
     ShapeMismatchError, ValueError, r"last dimension 4.*shape \(\)"),
    ("linear-ragged-input", lambda: Linear(2, 2, seed=0)([[1.0, 2.0], [3.0]]),
     InvalidDTypeError, TypeError, r"Linear input.*list"),
    ("linear-string-input", lambda: Linear(2, 2, seed=0)(np.array(["a", "b"])),
     InvalidDTypeError, TypeError, r"input.*<U1"),
    ("linear-complex-input", lambda: Linear(2, 2, seed=0)(np.ones(2, complex)),
     InvalidDTypeError, TypeError, r"input.*complex128"),
    ("linear-huge-features", lambda: Linear(10 ** 10, 10 ** 10),
     InvalidArgumentError, ValueError, r"Linear\(10000000000, 10000000000\)"),
    ("linear-huge-int-features", lambda: Linear(10 ** 400, 1),
     InvalidArgumentError, ValueError, r"Linear\(1000"),
    ("linear-bool-features", lambda: Linear(True, 2), InvalidArgumentError, ValueError,
     r"in_features.*bool"),
    ("linear-unknown-dtype", lambda: Linear(4, 2, dtype="float17"),
     InvalidDTypeError, TypeError, r"floating dtype.*'float17'"),
    ("linear-bad-seed", lambda: Linear(4, 2, seed="abc"),
     InvalidArgumentError, ValueError, r"seed.*'abc'"),
    ("linear-negative-seed", lambda: Linear(4, 2, seed=-1),
     InvalidArgumentError, ValueError, r"seed.*-1"),
    ("linear-seed-huge-fraction", lambda: Linear(4, 2, seed=fractions.Fraction(10 ** 400, 3)),
     InvalidArgumentError, ValueError, r"seed.*Fraction"),
    ("linear-bias-string", lambda: Linear(4, 2, bias="no"),
     InvalidArgumentError, ValueError, r"bias.*'no'"),
    ("sequential-not-callable", lambda: Sequential(Linear(2, 2), 5),
     InvalidArgumentError, ValueError, r"layer 1.*int 5"),
]


# --- aprender.torch: only where PyTorch is installed --------------------------------------------
try:
    import torch
except ImportError:  # pragma: no cover - torch is in the oracle extra
    torch = None

TORCH_CASES = []
if torch is not None:
    from aprender.torch import prune_, to_numpy_view

    def _lin(dtype=None):
        lin = torch.nn.Linear(4, 4)
        return lin.to(dtype) if dtype is not None else lin

    TORCH_CASES = [
        ("torch-float8-weight", lambda: prune_(_lin(torch.float8_e4m3fn), 0.5),
         InvalidDTypeError, TypeError, r"^weight.*float8_e4m3fn.*float16"),
        ("torch-float8-e5m2-named", lambda: prune_(torch.nn.Sequential(_lin(torch.float8_e5m2)),
                                                   0.5),
         InvalidDTypeError, TypeError, r"^0\.weight.*float8_e5m2"),
        ("torch-float8-view", lambda: to_numpy_view(torch.zeros(4, dtype=torch.float8_e4m3fn)),
         InvalidDTypeError, TypeError, r"float8_e4m3fn.*numpy"),
        ("torch-float8-apply", lambda: SparsityMask(np.ones(4, bool)).apply(
            torch.zeros(4, dtype=torch.float8_e4m3fn)),
         InvalidDTypeError, TypeError, r"float8_e4m3fn"),
        ("torch-include-int", lambda: prune_(_lin(), 0.5, include=5),
         InvalidArgumentError, ValueError, r"include.*int 5"),
        ("torch-include-list-of-int", lambda: prune_(_lin(), 0.5, include=[r"weight", 5]),
         InvalidArgumentError, ValueError, r"include.*list.*5"),
        ("torch-include-bytes", lambda: prune_(_lin(), 0.5, include=b"weight"),
         InvalidArgumentError, ValueError, r"include.*bytes"),
        ("torch-include-bad-regex", lambda: prune_(_lin(), 0.5, include="(weight"),
         InvalidArgumentError, ValueError, r"include.*'\(weight'"),
        ("torch-importance-array", lambda: prune_(_lin(), 0.5, importance=np.array([1, 2])),
         InvalidArgumentError, ValueError, r"importance.*'l1', 'l2'.*array"),
        ("torch-scope-list", lambda: prune_(_lin(), 0.5, scope=["global"]),
         InvalidArgumentError, ValueError, r"scope.*\['global'\]"),
        ("torch-keep-mask-string", lambda: prune_(_lin(), 0.5, keep_mask="yes"),
         InvalidArgumentError, ValueError, r"keep_mask.*'yes'"),
        ("torch-pattern-none", lambda: prune_(_lin(), 0.5, pattern=None),
         InvalidPatternError, ValueError, r"pattern.*string.*None"),
        ("torch-pattern-superscript", lambda: prune_(_lin(), pattern="\u00b2:4"),
         InvalidPatternError, ValueError, r"'\u00b2:4'"),
        ("torch-pattern-whole-rows", lambda: prune_(_lin(), 0.5, pattern=SparsityPattern.rows()),
         InvalidPatternError, ValueError, r"prune_.*per-row.*got row"),
        ("torch-sparsity-huge", lambda: prune_(_lin(), 10 ** 400),
         InvalidSparsityError, ValueError, r"sparsity.*too large.*1000"),
        ("torch-sparsity-nan", lambda: prune_(_lin(), float("nan")),
         InvalidSparsityError, ValueError, r"sparsity.*nan"),
        ("torch-sparsity-bool", lambda: prune_(_lin(), True),
         InvalidSparsityError, ValueError, r"sparsity.*bool.*True"),
        ("torch-sparsity-contradicts-nm", lambda: prune_(_lin(), 0.3, pattern="2:4"),
         InvalidSparsityError, ValueError, r"0\.3.*2:4"),
        ("torch-no-module", lambda: prune_("model", 0.5),
         InvalidArgumentError, ValueError, r"nn\.Module.*str"),
        ("torch-global-nm", lambda: prune_(_lin(), pattern="2:4", scope="global"),
         InvalidArgumentError, ValueError, r"global.*unstructured.*2:4"),
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_attack(case):
    check_error(case)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c[0])
def test_torch_attack(case):
    check_error(case)


def test_catalogue_ids_are_unique():
    ids = [c[0] for c in CASES + TORCH_CASES]
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

