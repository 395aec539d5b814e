"""A catalogue of bad inputs: every case names the exception type AND what its message must say.

Each row is (id, callable, expected exception type, regex the message must match).  The regexes
check that the message names the offending value, index, shape, axis or tensor, not the exact
wording.  Cases for the command line and the 2:4 layouts are added at the end when those modules
exist.
"""
import importlib.util
import re

import numpy as np
import pytest

from aprender import Bits16
from aprender.nn import Linear
from aprender.pruning import (InvalidArgumentError, InvalidDTypeError, InvalidPatternError,
                              InvalidShapeError, InvalidSparsityError, MagnitudeImportance,
                              NumericalInstabilityError, PruningError, ReadOnlyError,
                              ShapeMismatchError, SparsityMask, SparsityPattern,
                              generate_block_mask, generate_column_mask, generate_global_mask,
                              generate_nm_mask, generate_row_mask, generate_unstructured_mask,
                              magnitude_mask, magnitude_nm_mask)

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    BF16 = None

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _with(value, index, shape=(2, 4), dtype=np.float32):
    a = np.ones(shape, dtype)
    a[index] = value
    return a


def _readonly():
    a = np.ones((2, 4), np.float32)
    a.flags.writeable = False
    return a


def _mask():
    return SparsityMask(np.array([[True, False, True, False], [False, True, True, False]]))


def _bf16_with(value, index):
    if BF16 is None:
        pytest.skip("ml_dtypes is not installed")
    return _with(value, index, dtype=BF16)


# id, callable, expected type, message regex
CASES = [
    # --- sparsity -----------------------------------------------------------------------------
    ("sparsity-negative", lambda: generate_unstructured_mask(X, -0.1),
     InvalidSparsityError, r"sparsity.*\[0, 1\].*-0\.1"),
    ("sparsity-above-one", lambda: magnitude_mask(X, 1.5),
     InvalidSparsityError, r"sparsity.*\[0, 1\].*1\.5"),
    ("sparsity-nan", lambda: generate_unstructured_mask(X, float("nan")),
     InvalidSparsityError, r"sparsity.*nan"),
    ("sparsity-inf", lambda: magnitude_mask(X, float("inf")),
     InvalidSparsityError, r"sparsity.*inf"),
    ("sparsity-string", lambda: generate_unstructured_mask(X, "0.5"),
     InvalidSparsityError, r"sparsity.*str.*'0\.5'"),
    ("sparsity-bool", lambda: magnitude_mask(X, True),
     InvalidSparsityError, r"sparsity.*bool.*True"),
    ("sparsity-numpy-bool", lambda: magnitude_mask(X, np.bool_(False)),
     InvalidSparsityError, r"sparsity.*bool"),
    ("sparsity-complex64", lambda: generate_unstructured_mask(X, np.complex64(0.5)),
     InvalidSparsityError, r"sparsity.*complex"),
    ("sparsity-numpy-str", lambda: magnitude_mask(X, np.str_("0.5")),
     InvalidSparsityError, r"sparsity.*str"),
    ("sparsity-none", lambda: magnitude_mask(X, None),
     InvalidSparsityError, r"sparsity.*None"),
    ("sparsity-array", lambda: magnitude_mask(X, np.array([0.5])),
     InvalidSparsityError, r"sparsity.*ndarray"),
    ("sparsity-per-row", lambda: magnitude_mask(X, 2, per_row=True),
     InvalidSparsityError, r"sparsity.*\[0, 1\].*2"),
    ("sparsity-global", lambda: generate_global_mask([X], -1),
     InvalidSparsityError, r"sparsity.*-1"),
    ("sparsity-block", lambda: generate_block_mask(X, 1.01, (1, 2)),
     InvalidSparsityError, r"sparsity.*1\.01"),
    ("sparsity-row", lambda: generate_row_mask(X, "half"),
     InvalidSparsityError, r"sparsity.*'half'"),
    ("sparsity-column", lambda: generate_column_mask(X, float("nan")),
     InvalidSparsityError, r"sparsity.*nan"),
    ("max-tensor-sparsity-out-of-range",
     lambda: generate_global_mask([X], 0.5, max_tensor_sparsity=2),
     InvalidSparsityError, r"max_tensor_sparsity.*2"),
    ("max-tensor-sparsity-unreachable",
     lambda: generate_global_mask([X], 0.9, max_tensor_sparsity=0.5),
     InvalidSparsityError, r"max_tensor_sparsity=0\.5"),
    # --- N:M ----------------------------------------------------------------------------------
    ("nm-n-above-m", lambda: generate_nm_mask(X, 5, 4),
     InvalidPatternError, r"N <= M.*5:4"),
    ("nm-n-zero", lambda: magnitude_nm_mask(X, 0, 4), InvalidPatternError, r"0:4"),
    ("nm-n-negative", lambda: generate_nm_mask(X, -1, 4), InvalidPatternError, r"-1:4"),
    ("nm-m-zero", lambda: generate_nm_mask(X, 2, 0), InvalidPatternError, r"2:0"),
    ("nm-m-negative", lambda: magnitude_nm_mask(X, 1, -4), InvalidPatternError, r"1:-4"),
    ("nm-n-float", lambda: generate_nm_mask(X, 2.0, 4), InvalidPatternError, r"integer n.*2\.0"),
    ("nm-m-bool", lambda: generate_nm_mask(X, 1, True), InvalidPatternError, r"integer m.*True"),
    ("nm-m-does-not-divide", lambda: generate_nm_mask(X, 2, 3),
     InvalidPatternError, r"axis 1.*\(2, 4\).*length 4.*M=3"),
    ("nm-m-does-not-divide-axis0", lambda: magnitude_nm_mask(X, 1, 4, axis=0),
     InvalidPatternError, r"axis 0.*length 2.*M=4"),
    ("nm-m-too-large", lambda: generate_nm_mask(np.zeros(4096, np.float32), 2, 2048),
     InvalidPatternError, r"M.*1024.*2048"),
    ("nm-axis-out-of-range", lambda: generate_nm_mask(X, 2, 4, axis=2),
     InvalidShapeError, r"axis 2.*out of range.*2 dimension"),
    ("nm-axis-negative-out-of-range", lambda: magnitude_nm_mask(X, 2, 4, axis=-3),
     InvalidShapeError, r"axis -3.*out of range"),
    ("nm-axis-float", lambda: generate_nm_mask(X, 2, 4, axis=1.0),
     InvalidShapeError, r"axis.*integer.*1\.0"),
    # --- 0-d arrays ---------------------------------------------------------------------------
    ("0d-values", lambda: generate_unstructured_mask(np.array(1.0), 0.5),
     InvalidShapeError, r"values.*0-d"),
    ("0d-weights", lambda: magnitude_mask(np.float32(1.0), 0.5), InvalidShapeError, r"weights.*0-d"),
    ("0d-python-float", lambda: magnitude_mask(1.0, 0.5), InvalidShapeError, r"0-d"),
    ("0d-nm", lambda: magnitude_nm_mask(np.array(1.0), 1, 1), InvalidShapeError, r"0-d"),
    ("0d-global", lambda: generate_global_mask([X, np.array(1.0)], 0.5),
     InvalidShapeError, r"values\[1\].*0-d"),
    ("0d-block", lambda: generate_block_mask(np.array(1.0), 0.5, (1, 1)),
     InvalidShapeError, r"0-d"),
    ("0d-row", lambda: generate_row_mask(np.array(1.0), 0.5), InvalidShapeError, r"0-d"),
    ("0d-importance", lambda: MagnitudeImportance.l1().compute(np.array(2.0)),
     InvalidShapeError, r"weights.*0-d"),
    ("0d-mask", lambda: SparsityMask(np.array(True)), InvalidShapeError, r"0-d"),
    # --- dtypes -------------------------------------------------------------------------------
    ("dtype-object", lambda: generate_unstructured_mask(np.array([1.0, 2.0], object), 0.5),
     InvalidDTypeError, r"values.*floating.*object"),
    ("dtype-complex", lambda: magnitude_mask(np.array([1.0, 2.0], complex), 0.5),
     InvalidDTypeError, r"weights.*floating.*complex128"),
    ("dtype-int", lambda: magnitude_nm_mask(np.arange(4), 2, 4),
     InvalidDTypeError, r"weights.*floating.*int64"),
    ("dtype-bool", lambda: generate_nm_mask(np.ones(4, bool), 2, 4),
     InvalidDTypeError, r"values.*floating.*bool"),
    ("dtype-uint16-hint", lambda: magnitude_mask(np.zeros(4, np.uint16), 0.5),
     InvalidDTypeError, r"uint16.*Bits16"),
    ("dtype-string", lambda: magnitude_mask(np.array(["a", "b"]), 0.5),
     InvalidDTypeError, r"floating.*<U1"),
    ("dtype-ragged", lambda: magnitude_mask([[1.0], [2.0, 3.0]], 0.5),
     InvalidDTypeError, r"weights.*cannot convert list"),
    ("dtype-longdouble", lambda: magnitude_mask(np.ones(4, np.longdouble), 0.5),
     InvalidDTypeError, r"floating.*float(128|96|64)"),
    ("dtype-global-names-tensor", lambda: generate_global_mask({"a": X, "b": np.arange(3)}, 0.5),
     InvalidDTypeError, r"^b: .*int64"),
    ("dtype-global-container", lambda: generate_global_mask("abc", 0.5),
     InvalidDTypeError, r"mapping.*sequence.*str"),
    ("dtype-importance-complex", lambda: MagnitudeImportance.l2().compute(np.array([1j])),
     InvalidDTypeError, r"weights.*complex"),
    ("dtype-importance-int", lambda: MagnitudeImportance.l1().compute(np.arange(4)),
     InvalidDTypeError, r"weights.*int64"),
    ("dtype-block-int", lambda: generate_block_mask(np.ones((2, 2), np.int32), 0.5, (1, 1)),
     InvalidDTypeError, r"values.*int32"),
    ("bits16-not-uint16", lambda: Bits16(np.zeros(4, np.float16)),
     InvalidDTypeError, r"uint16.*float16"),
    ("bits16-format", lambda: Bits16(np.zeros(4, np.uint16), "float32"),
     InvalidArgumentError, r"'bfloat16' or 'float16'.*'float32'"),
    # --- NaN and inf: the message names the first bad index -----------------------------------
    ("nan-values", lambda: generate_unstructured_mask(_with(np.nan, (1, 1)), 0.5),
     NumericalInstabilityError, r"values.*NaN.*\(1, 1\).*flat index 5"),
    ("nan-weights-first-of-two", lambda: magnitude_mask(
        _with(np.nan, (1, 3)) + _with(np.inf, (1, 2)) - 1, 0.5),
     NumericalInstabilityError, r"weights.*inf.*\(1, 2\)"),
    ("nan-weights-sparsity-zero", lambda: magnitude_mask(_with(np.nan, (0, 2)), 0.0),
     NumericalInstabilityError, r"NaN.*\(0, 2\)"),
    ("nan-weights-sparsity-one", lambda: magnitude_mask(_with(np.nan, (0, 2)), 1.0),
     NumericalInstabilityError, r"NaN.*\(0, 2\)"),
    ("inf-per-row", lambda: magnitude_mask(_with(np.inf, (1, 2)), 0.5, per_row=True),
     NumericalInstabilityError, r"weights.*inf.*\(1, 2\)"),
    ("minus-inf-nm", lambda: magnitude_nm_mask(_with(-np.inf, (0, 3)), 2, 4),
     NumericalInstabilityError, r"weights.*-inf.*\(0, 3\)"),
    ("nan-nm-axis0", lambda: generate_nm_mask(_with(np.nan, (3, 1), shape=(4, 2)), 2, 4, axis=0),
     NumericalInstabilityError, r"values.*NaN.*\(3, 1\)"),
    ("nan-float16", lambda: magnitude_mask(_with(np.nan, (0, 1), dtype=np.float16), 0.5),
     NumericalInstabilityError, r"NaN.*\(0, 1\)"),
    ("inf-float64", lambda: generate_unstructured_mask(_with(-np.inf, (1, 0), dtype=np.float64), 0.5),
     NumericalInstabilityError, r"-inf.*\(1, 0\)"),
    ("nan-bfloat16", lambda: magnitude_mask(_bf16_with(np.nan, (1, 3)), 0.5),
     NumericalInstabilityError, r"NaN.*\(1, 3\)"),
    ("nan-bits16-bf16", lambda: magnitude_mask(
        Bits16(np.array([0x3F80, 0x7FC0, 0x7F80], np.uint16), "bfloat16"), 0.5),
     NumericalInstabilityError, r"NaN.*\(1,\)"),
    ("minus-inf-bits16-f16", lambda: magnitude_nm_mask(
        Bits16(np.array([0x3C00, 0x0000, 0xFC00, 0x3C00], np.uint16), "float16"), 2, 4),
     NumericalInstabilityError, r"-inf.*\(2,\)"),
    ("nan-global-names-tensor", lambda: generate_global_mask({"a": X, "b": _with(np.nan, (0, 2))},
                                                             0.5),
     NumericalInstabilityError, r"^b contains NaN.*\(0, 2\)"),
    ("nan-global-list", lambda: generate_global_mask([X, _with(np.inf, (1, 1))], 0.5),
     NumericalInstabilityError, r"values\[1\].*inf.*\(1, 1\)"),
    ("nan-global-capped", lambda: generate_global_mask([X, _with(np.nan, (0, 0))], 0.5,
                                                       max_tensor_sparsity=0.75),
     NumericalInstabilityError, r"values\[1\].*NaN.*\(0, 0\)"),
    ("nan-block", lambda: generate_block_mask(_with(np.nan, (1, 1)), 0.5, (2, 2)),
     NumericalInstabilityError, r"NaN.*\(1, 1\)"),
    ("nan-row", lambda: generate_row_mask(_with(np.nan, (1, 3)), 0.5),
     NumericalInstabilityError, r"NaN.*\(1, 3\)"),
    ("inf-column", lambda: generate_column_mask(_with(np.inf, (0, 2)), 0.5),
     NumericalInstabilityError, r"inf.*\(0, 2\)"),
    ("nan-importance", lambda: MagnitudeImportance.l1().compute(_with(np.nan, (1, 1))),
     NumericalInstabilityError, r"weights.*NaN.*\(1, 1\)"),
    ("inf-importance-p3", lambda: MagnitudeImportance(3).compute(_with(-np.inf, (0, 1))),
     NumericalInstabilityError, r"weights.*-inf.*\(0, 1\)"),
    # --- apply --------------------------------------------------------------------------------
    ("apply-shape-mismatch", lambda: _mask().apply(np.ones((4, 2), np.float32)),
     ShapeMismatchError, r"\(2, 4\).*\(4, 2\)"),
    ("apply-read-only", lambda: _mask().apply(_readonly()), ReadOnlyError, r"read-only"),
    ("apply-object", lambda: _mask().apply(np.ones((2, 4), object)),
     InvalidDTypeError, r"dtype object"),
    ("apply-string", lambda: _mask().apply(np.full((2, 4), "abc")),
     InvalidDTypeError, r"<U3"),
    ("apply-16-byte-elements", lambda: _mask().apply(np.ones((2, 4), np.clongdouble)),
     InvalidDTypeError, r"1, 2, 4 and 8 bytes.*complex"),
    ("apply-list", lambda: _mask().apply([[1.0] * 4] * 2), InvalidDTypeError, r"got list"),
    ("apply-n-threads-zero", lambda: _mask().apply(np.ones((2, 4)), n_threads=0),
     InvalidArgumentError, r"n_threads.*>= 1.*0"),
    # --- SparsityMask and SparsityPattern -----------------------------------------------------
    ("mask-non-binary", lambda: SparsityMask(np.array([0, 1, 2])),
     InvalidPatternError, r"binary"),
    ("mask-fractional", lambda: SparsityMask(np.array([0.0, 0.5])), InvalidPatternError, r"binary"),
    ("mask-nan", lambda: SparsityMask(np.array([1.0, np.nan])), InvalidPatternError, r"binary"),
    ("mask-strings", lambda: SparsityMask(np.array(["1", "0"])), InvalidDTypeError, r"<U1"),
    ("mask-object", lambda: SparsityMask(np.array([1, 0], object)), InvalidDTypeError, r"object"),
    ("mask-breaks-2:4", lambda: SparsityMask(np.array([1, 1, 1, 0, 1, 1, 0, 0], bool),
                                             SparsityPattern.nm(2, 4)),
     InvalidPatternError, r"2:4.*1 of 2 groups"),
    ("mask-2:4-not-dividing", lambda: SparsityMask(np.ones(6, bool), SparsityPattern.nm(2, 4)),
     InvalidPatternError, r"2:4.*\(6,\).*M=4"),
    ("mask-breaks-block", lambda: SparsityMask(np.array([[1, 0], [1, 1]], bool),
                                               SparsityPattern.block_pattern(2, 2)),
     InvalidPatternError, r"block 2x2.*1 of 1"),
    ("mask-breaks-rows", lambda: SparsityMask(np.array([[1, 0], [1, 1]], bool),
                                              SparsityPattern.rows()),
     InvalidPatternError, r"row.*1 of 2"),
    ("mask-pattern-string", lambda: SparsityMask(np.ones(4, bool), "2:4"),
     InvalidPatternError, r"SparsityPattern.*'2:4'"),
    ("validate-breaks-2:4", lambda: SparsityPattern.nm(2, 4).validate(np.ones((2, 4), bool)),
     InvalidPatternError, r"2 of 2 groups"),
    ("pattern-unknown-kind", lambda: SparsityPattern("diagonal"),
     InvalidPatternError, r"'diagonal'"),
    ("pattern-nm-5:4", lambda: SparsityPattern.nm(5, 4), InvalidPatternError, r"5:4"),
    ("pattern-block-zero", lambda: SparsityPattern.block_pattern(0, 4),
     InvalidPatternError, r"block size.*0"),
    ("parse-dash", lambda: SparsityPattern.parse("2-4"), InvalidPatternError, r"'2-4'.*N:M"),
    ("parse-5:4", lambda: SparsityPattern.parse("5:4"), InvalidPatternError, r"N <= M.*5:4"),
    ("parse-0:4", lambda: SparsityPattern.parse("0:4"), InvalidPatternError, r"0:4"),
    ("parse-4:0", lambda: SparsityPattern.parse("4:0"), InvalidPatternError, r"4:0"),
    ("parse-empty", lambda: SparsityPattern.parse(""), InvalidPatternError, r"invalid pattern ''"),
    ("parse-negative", lambda: SparsityPattern.parse("-2:4"), InvalidPatternError, r"'-2:4'"),
    ("parse-three-parts", lambda: SparsityPattern.parse("2:4:8"), InvalidPatternError, r"'2:4:8'"),
    ("parse-float", lambda: SparsityPattern.parse("2.0:4"), InvalidPatternError, r"'2\.0:4'"),
    ("parse-block-malformed", lambda: SparsityPattern.parse("block:4"),
     InvalidPatternError, r"block:4x4.*'block:4'"),
    ("parse-not-a-string", lambda: SparsityPattern.parse(24), InvalidPatternError, r"string.*24"),
    # --- blocks -------------------------------------------------------------------------------
    ("block-does-not-tile", lambda: generate_block_mask(X, 0.5, (3, 2)),
     InvalidPatternError, r"\(3, 2\).*\(2, 4\)"),
    ("block-does-not-tile-3d", lambda: generate_block_mask(np.ones((2, 3, 4), np.float32), 0.5,
                                                            (4, 4)),
     InvalidPatternError, r"\(4, 4\).*\(2, 3, 4\).*6x4"),
    ("block-zero-size", lambda: generate_block_mask(X, 0.5, (0, 2)),
     InvalidPatternError, r"block size.*0"),
    ("block-not-a-pair", lambda: generate_block_mask(X, 0.5, (1, 2, 3)),
     InvalidPatternError, r"pair.*\(1, 2, 3\)"),
    ("block-int", lambda: generate_block_mask(X, 0.5, 2), InvalidPatternError, r"pair.*2"),
    # --- n_threads ----------------------------------------------------------------------------
    ("threads-zero", lambda: generate_unstructured_mask(X, 0.5, n_threads=0),
     InvalidArgumentError, r"n_threads.*>= 1.*0"),
    ("threads-negative", lambda: magnitude_nm_mask(X, 2, 4, n_threads=-1),
     InvalidArgumentError, r"n_threads.*-1"),
    ("threads-string", lambda: generate_global_mask([X], 0.5, n_threads="2"),
     InvalidArgumentError, r"n_threads.*integer.*'2'"),
    ("threads-float", lambda: magnitude_mask(X, 0.5, n_threads=2.0),
     InvalidArgumentError, r"n_threads.*integer.*2\.0"),
    ("threads-bool", lambda: generate_row_mask(X, 0.5, n_threads=True),
     InvalidArgumentError, r"n_threads.*bool"),
    ("threads-importance", lambda: MagnitudeImportance.l1().compute(X, n_threads=0),
     InvalidArgumentError, r"n_threads.*0"),
    # --- MagnitudeImportance and nn.Linear ----------------------------------------------------
    ("p-zero", lambda: MagnitudeImportance(0), InvalidArgumentError, r"p > 0.*0"),
    ("p-negative", lambda: MagnitudeImportance(-1), InvalidArgumentError, r"-1"),
    ("p-nan", lambda: MagnitudeImportance(float("nan")), InvalidArgumentError, r"finite.*nan"),
    ("p-inf", lambda: MagnitudeImportance(float("inf")), InvalidArgumentError, r"finite.*inf"),
    ("p-string", lambda: MagnitudeImportance("x"), InvalidArgumentError, r"'x'"),
    ("p-bool", lambda: MagnitudeImportance(True), InvalidArgumentError, r"True"),
    ("p-complex", lambda: MagnitudeImportance(1j), InvalidArgumentError, r"1j"),
    ("linear-zero-features", lambda: Linear(0, 4), InvalidArgumentError, r"in_features.*0"),
    ("linear-int-dtype", lambda: Linear(4, 4, dtype=np.int32), InvalidDTypeError, r"int32"),
    ("linear-input-shape", lambda: Linear(4, 2, seed=0)(np.ones((3, 5), np.float32)),
     ShapeMismatchError, r"4.*\(3, 5\)"),
]


# ----------------------------------------------------------------------------------------------
# optional modules: the command line and the 2:4 layouts (only when they exist)
# ----------------------------------------------------------------------------------------------

def _have(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # pragma: no cover - parent package broken
        return False


OPTIONAL_CASES = []

if _have("aprender.sparse24"):
    def _s24(*args, **kwargs):
        from aprender import sparse24

        return sparse24.compress(*args, **kwargs)

    _NOT24 = np.array([[1, 1, 1, 0] * 8] * 32, np.float16)  # three non-zeros in every group
    OPTIONAL_CASES += [
        ("s24-not-2:4", lambda: _s24(_NOT24, layout="raw"), PruningError, r"2:4|two|group"),
        ("s24-bad-layout", lambda: _s24(np.zeros((32, 32), np.float16), layout="csr"),
         PruningError, r"'csr'"),
        ("s24-cols-not-multiple-of-4", lambda: _s24(np.zeros((4, 6), np.float16), layout="raw"),
         PruningError, r"6|4"),
        ("s24-float64", lambda: _s24(np.zeros((4, 8), np.float64), layout="raw"),
         PruningError, r"float64"),
    ]

if _have("aprender.cli"):
    def _cli(*argv):
        """Run the command line; a non-zero exit becomes SystemExit("<code>: <stderr>")."""
        import contextlib
        import io

        from aprender import cli

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(argv))
            except SystemExit as exc:
                code = exc.code
        if code:
            raise SystemExit(f"{code}: {err.getvalue().strip()}")
        return code

    OPTIONAL_CASES += [
        ("cli-bad-sparsity", lambda: _cli("prune", "in.safetensors", "-o", "out.safetensors",
                                          "--sparsity", "1.5"),
         SystemExit, r"^2: .*sparsity.*1\.5"),
        ("cli-bad-pattern", lambda: _cli("prune", "in.safetensors", "-o", "out.safetensors",
                                         "--sparsity", "0.5", "--pattern", "5:4"),
         SystemExit, r"^2: .*pattern.*5:4"),
        ("cli-bad-threads", lambda: _cli("prune", "in.safetensors", "-o", "out.safetensors",
                                         "--sparsity", "0.5", "--threads", "0"),
         SystemExit, r"^2: .*threads.*0"),
    ]


def _id(case):
    return case[0]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bad_input(case):
    _, fn, exc_type, regex = case
    with pytest.raises(exc_type) as info:
        fn()
    assert type(info.value) is exc_type or exc_type is SystemExit, \
        f"expected exactly {exc_type.__name__}, got {type(info.value).__name__}"
    assert isinstance(info.value, PruningError)
    assert isinstance(info.value, (ValueError, TypeError))
    message = str(info.value)
    assert re.search(regex, message), f"message {message!r} does not match {regex!r}"


@pytest.mark.parametrize("case", OPTIONAL_CASES, ids=_id)
def test_bad_input_optional_modules(case):
    _, fn, exc_type, regex = case
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert re.search(regex, message), f"message {message!r} does not match {regex!r}"


def test_catalogue_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES + OPTIONAL_CASES]
    assert len(CASES) >= 40
    assert len(ids) == len(set(ids))


def test_numerical_error_carries_index_and_kind():
    with pytest.raises(NumericalInstabilityError) as info:
        magnitude_mask(_with(np.nan, (1, 2)), 0.5)
    assert info.value.index == (1, 2)
    assert info.value.value == "NaN"


def test_errors_are_catchable_as_builtin_exceptions():
    with pytest.raises(ValueError):
        generate_unstructured_mask(X, 2.0)
    with pytest.raises(TypeError):
        magnitude_mask(np.arange(4), 0.5)


def test_review_found_error_types():
    """Regressions from review: overflowing numbers get the typed error, not OverflowError."""
    from aprender.pruning import InvalidArgumentError, InvalidSparsityError

    with pytest.raises(InvalidSparsityError, match="sparsity"):
        generate_unstructured_mask(np.ones(4, np.float32), 10 ** 400)
    with pytest.raises(InvalidArgumentError, match="n_threads must be at most"):
        generate_unstructured_mask(np.ones(4, np.float32), 0.5, n_threads=2 ** 40)
