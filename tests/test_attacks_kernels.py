"""A catalogue of hostile calls to every Python-callable kernel entry point.

Each case calls one entry point of aprender._kernels with buffers that are too short or too long,
lengths that disagree, None where a buffer belongs, wrong dtypes or dimensions, and negative or
huge counts, ranks, shifts and thresholds.  Each must raise a typed error (PruningError, also a
ValueError or TypeError) whose message names the problem, and never read or write out of bounds:
an out-of-bounds access would crash the interpreter (pytest's faulthandler then prints the case
and the run fails) or corrupt the guard bytes checked by test_writes_stay_inside_their_buffers.
"""
import re
from types import SimpleNamespace

import numpy as np
import pytest

from aprender import sparse24
from aprender._kernels import _openmp, apply, jsonscan, nm, select, stats
from aprender._kernels import sparse24 as s24
from aprender._kernels import sparsegpt as sg
from aprender.pruning import selection
from aprender.errors import (InvalidArgumentError, InvalidDTypeError, InvalidShapeError,
                             LayoutError, PruningError, ShapeMismatchError)

F32 = np.arange(1, 65, dtype=np.float32)
U8 = np.zeros(64, np.uint8)
KEYS = np.arange(10, dtype=np.uint64)
BIG = 2**62
HUGE_INT = 2**40  # does not fit a C int


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _u(n, dtype=np.uint8):
    return np.zeros(n, dtype)


def _f32(shape):
    return np.ones(shape, np.float32)


_NONE = np.empty((0, 0), np.uint8)  # no forced weights


def _marked():
    """A mask marked by mark_pass over F32 (10 candidates in [21, 30]) and its counts."""
    out = _u(64)
    lo = int(np.float32(21).view(np.uint32)) | 2**31
    hi = int(np.float32(30).view(np.uint32)) | 2**31
    _, inside, _, counts = select.mark_pass(F32, lo, hi, 1, 0, out, 1)
    assert inside == 10
    return out, counts, lo, hi


def _s24_args(layout=2, rows=32, cols=32, wide=0, mode=0, **over):
    """compress(...) arguments for a (rows, cols) uint16 weight, overridable by name."""
    nbytes = (cols // 4 + 1) // 2
    nwords = cols // 4 // (8 if wide else 4)
    args = dict(
        x=np.zeros((rows, cols), np.uint16), keep=None, mode=mode, kinf=0, layout=layout,
        wide=wide, vals=np.zeros((rows, cols // 2), np.uint16),
        codes=np.zeros((rows, nbytes), np.uint8) if layout == 2 else None,
        bits=np.zeros((rows, nbytes), np.uint8) if layout == 1 else None,
        meta=np.zeros(rows * nwords * (4 if wide else 2), np.uint8) if layout == 0 else None,
        n_threads=1)
    args.update(over)
    return args


def _compress(**over):
    a = _s24_args(**over)
    return s24.compress(a["x"], a["keep"], a["mode"], a["kinf"], a["layout"], a["wide"],
                        a["vals"], a["codes"], a["bits"], a["meta"], a["n_threads"])


def _decompress(layout=2, rows=32, cols=32, wide=0, **over):
    nbytes = (cols // 4 + 1) // 2
    nwords = cols // 4 // (8 if wide else 4)
    args = dict(vals=np.zeros((rows, cols // 2), np.uint16),
                codes=np.full((rows, nbytes), 0x44, np.uint8) if layout else None,
                meta=np.zeros(rows * nwords * (4 if wide else 2), np.uint8) if layout == 0
                else None,
                out=np.zeros((rows, cols), np.uint16))
    args.update(over)
    return s24.decompress(args["vals"], args["codes"], args["meta"], layout, wide, args["out"], 1)


def _tensor(layout, **over):
    """Sparse24Tensor parts for a float16 (64, 64) weight, overridable by name."""
    parts = dict(layout=layout, shape=(64, 64), dtype="float16",
                 values=np.zeros((64, 32), np.float16), padded_shape=(64, 64))
    if layout == "cutlass":
        parts["metadata"] = np.zeros((64, 4), np.int16)
    elif layout == "raw":
        parts["metadata"] = np.zeros((64, 8), np.uint8)
    else:
        parts["bitmask"] = np.full((64, 8), 0x33, np.uint8)
    parts.update(over)
    return lambda: sparse24.Sparse24Tensor(**parts).to_dense()


# (id, entry point, call, error type, message pattern)
CASES = [
    ("jsonscan-none", "scan", lambda: jsonscan.scan(None, 3, 64, 20, 4096),
     InvalidArgumentError, "must not be None"),
    ("jsonscan-2d", "scan", lambda: jsonscan.scan(np.zeros((2, 2), np.uint8), 3, 64, 20, 4096),
     (InvalidDTypeError, InvalidShapeError), "scan"),
    ("jsonscan-wrong-dtype", "scan", lambda: jsonscan.scan(np.zeros(4, np.int32), 3, 64, 20, 9),
     InvalidDTypeError, "scan"),
    ("jsonscan-negative-limit", "scan", lambda: jsonscan.scan(U8, -1, 64, 20, 4096),
     InvalidArgumentError, "limits must be >= 0"),
    ("jsonscan-huge-limit", "scan", lambda: jsonscan.scan(U8, 2 ** 70, 64, 20, 4096),
     (InvalidArgumentError, InvalidDTypeError), "scan"),
    # --- apply ---------------------------------------------------------------------------------
    ("apply-keep-short", "apply_mask", lambda: apply.apply_mask(_u(8, np.uint32), _u(7), 1),
     ShapeMismatchError, r"keep holds 7 elements, the weights 8"),
    ("apply-keep-long", "apply_mask", lambda: apply.apply_mask(_u(8, np.uint32), _u(9), 1),
     ShapeMismatchError, r"keep holds 9 elements, the weights 8"),
    ("apply-keep-none", "apply_mask", lambda: apply.apply_mask(_u(8, np.uint32), None, 1),
     InvalidArgumentError, r"'keep' must not be None"),
    ("apply-weights-2d", "apply_mask",
     lambda: apply.apply_mask(np.zeros((2, 4), np.uint32), _u(8), 1), InvalidDTypeError,
     r"no kernel takes these buffers.*w: uint32 array of shape \(2, 4\)"),
    ("apply-read-only", "apply_mask",
     lambda: apply.apply_mask(np.broadcast_to(np.uint32(1), (8,)), _u(8), 1),
     InvalidArgumentError, r"read-only|writable|contiguous"),
    ("apply-threads-huge", "apply_mask",
     lambda: apply.apply_mask(_u(8, np.uint32), _u(8), HUGE_INT), InvalidArgumentError,
     r"out of range"),
    ("count-none", "count_nonzero_u8", lambda: apply.count_nonzero_u8(None, 1),
     InvalidArgumentError, r"'keep' must not be None"),
    ("count-float", "count_nonzero_u8", lambda: apply.count_nonzero_u8(F32, 1),
     InvalidDTypeError, r"dtype"),
    # --- stats ---------------------------------------------------------------------------------
    ("stats-out-short", "scores_stats",
     lambda: stats.scores_stats(F32, 1, 1.0, 0, np.zeros(63, np.float32), 1),
     ShapeMismatchError, r"out holds 63 elements.*64"),
    ("stats-out-long", "scores_stats",
     lambda: stats.scores_stats(F32, 1, 1.0, 0, np.zeros(65, np.float32), 1),
     ShapeMismatchError, r"out holds 65 elements.*64"),
    ("stats-out-dtype", "scores_stats",
     lambda: stats.scores_stats(F32, 1, 1.0, 0, np.zeros(64, np.float64), 1),
     InvalidDTypeError, r"dtype"),
    ("stats-none", "scores_stats", lambda: stats.scores_stats(None, 1, 1.0, 0, F32, 1),
     InvalidArgumentError, r"no kernel takes these buffers.*x: None"),
    # --- nm ------------------------------------------------------------------------------------
    ("nm-out-short", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, 2, 4, 1, 0, _u(60), 1),
     ShapeMismatchError, r"out holds 60 elements, x 64"),
    ("nm-view-too-big", "nm_mask", lambda: nm.nm_mask(F32, 2, 64, 1, 2, 4, 1, 0, _u(64), 1),
     ShapeMismatchError, r"x holds 64 elements, the view .* 128"),
    ("nm-view-inner-too-big", "nm_mask", lambda: nm.nm_mask(F32, 1, 4, 32, 2, 4, 1, 0, _u(64), 1),
     ShapeMismatchError, r"x holds 64 elements, the view .* 128"),
    ("nm-view-huge", "nm_mask", lambda: nm.nm_mask(F32, BIG, 64, BIG, 2, 4, 1, 0, _u(64), 1),
     ShapeMismatchError, r"x holds 64 elements"),
    ("nm-outer-negative", "nm_mask", lambda: nm.nm_mask(F32, -1, -64, 1, 2, 4, 1, 0, _u(64), 1),
     InvalidShapeError, r"sizes >= 0"),
    ("nm-length-not-groups", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, 2, 3, 1, 0, _u(64), 1),
     InvalidShapeError, r"length 64 is not a multiple of M=3"),
    ("nm-m-zero", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, 0, 0, 1, 0, _u(64), 1),
     InvalidArgumentError, r"M must be in \[1, 1024\], got 0"),
    ("nm-m-huge", "nm_mask", lambda: nm.nm_mask(F32, 1, 4096, 1, 2, 4096, 1, 0, _u(64), 1),
     InvalidArgumentError, r"M must be in \[1, 1024\], got 4096"),
    ("nm-n-above-m", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, 5, 4, 1, 0, _u(64), 1),
     InvalidArgumentError, r"N must be in \[1, M=4\], got 5"),
    ("nm-n-negative", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, -2, 4, 1, 0, _u(64), 1),
     InvalidArgumentError, r"N must be in \[1, M=4\], got -2"),
    ("nm-n-huge", "nm_mask", lambda: nm.nm_mask(F32, 1, 64, 1, HUGE_INT, 4, 1, 0, _u(64), 1),
     InvalidArgumentError, r"out of range"),
    ("nm-check-short", "nm_check", lambda: nm.nm_check(_u(60), 1, 64, 1, 2, 4),
     ShapeMismatchError, r"keep holds 60 elements"),
    ("nm-check-m-zero", "nm_check", lambda: nm.nm_check(_u(64), 1, 64, 1, 2, 0),
     InvalidArgumentError, r"M must be in"),
    # --- select: key buffers -------------------------------------------------------------------
    ("budget-negative", "scratch_budget", lambda: select.scratch_budget(-1),
     InvalidArgumentError, r"nbytes must be >= 0, got -1"),
    ("select-keys-empty", "select_keys", lambda: select.select_keys(_u(0, np.uint64), 0),
     InvalidArgumentError, r"rank 0 outside \[0, 0\)"),
    ("select-keys-rank-huge", "select_keys", lambda: select.select_keys(KEYS.copy(), BIG),
     InvalidArgumentError, r"rank \d+ outside \[0, 10\)"),
    ("select-below-negative", "select_keys_below",
     lambda: select.select_keys_below(KEYS.copy(), -1), InvalidArgumentError,
     r"rank -1 outside \[0, 10\)"),
    ("select-keys-float", "select_keys", lambda: select.select_keys(F32, 1),
     InvalidDTypeError, r"signature|dtype"),
    ("zero-float", "zero_pass", lambda: select.zero_pass(F32, 0, 0, 1), InvalidDTypeError,
     r"zero_pass"),
    ("zero-none", "zero_pass", lambda: select.zero_pass(None, 0, 0, 1), InvalidArgumentError,
     r"zero_pass: no kernel takes these buffers.*words: None"),
    ("zero-readonly", "zero_pass", lambda: select.zero_pass(_readonly(KEYS), 0, 0, 1),
     InvalidArgumentError, r"zero_pass: buffer source array is read-only"),
    ("bracket-crossed", "sample_bracket", lambda: select.sample_bracket(KEYS, 5, 2),
     InvalidArgumentError, r"ranks \(5, 2\) must satisfy"),
    ("bracket-beyond", "sample_bracket", lambda: select.sample_bracket(KEYS, 0, 10),
     InvalidArgumentError, r"ranks \(0, 10\).*< 10"),
    ("bracket-empty", "sample_bracket", lambda: select.sample_bracket(KEYS[:0], 0, 0),
     InvalidArgumentError, r"ranks \(0, 0\).*for 0 keys"),
    ("bracket-float", "sample_bracket", lambda: select.sample_bracket(F32, 0, 1),
     InvalidDTypeError, r"sample_bracket"),
    ("hist-rank-beyond", "select_hist", lambda: select.select_hist([KEYS], 10, 0, 9),
     InvalidArgumentError, r"rank 10 outside \[0, 10\)"),
    ("hist-rank-negative", "select_hist", lambda: select.select_hist([KEYS], -3, 0, 9),
     InvalidArgumentError, r"rank -3 outside"),
    ("hist-mixed-widths", "select_hist",
     lambda: select.select_hist([KEYS, KEYS.astype(np.uint32)], 0, 0, 9),
     InvalidArgumentError, r"one width"),
    ("hist-2d", "select_hist", lambda: select.select_hist([KEYS.reshape(2, 5)], 0, 0, 9),
     InvalidArgumentError, r"1-d uint16/uint32/uint64"),
    ("hist-float", "select_hist", lambda: select.select_hist([F32], 0, 0, 9),
     InvalidArgumentError, r"1-d uint16/uint32/uint64"),
    ("hist-crossed-bracket", "select_hist", lambda: select.select_hist([KEYS], 0, 9, 0),
     InvalidArgumentError, r"lo=9 > hi=0"),
    # --- select: sample ------------------------------------------------------------------------
    ("sample-out-short", "sample_keys",
     lambda: select.sample_keys(F32, 40, 1, 1, 1, _u(39, np.uint32)), ShapeMismatchError,
     r"out holds 39 keys, the sample needs 40"),
    ("sample-out-narrow", "sample_keys",
     lambda: select.sample_keys(F32, 4, 1, 1, 1, _u(8, np.uint16)), InvalidArgumentError,
     r"16-bit keys.*32-bit values do not fit"),
    ("sample-into-short", "sample_into",
     lambda: select.sample_into(F32, BIG, 1, 1, 1, _u(63, np.uint64)), ShapeMismatchError,
     r"out holds 63 keys, the sample needs 64"),
    ("sample-into-none", "sample_into", lambda: select.sample_into(F32, 4, 1, 1, 1, None),
     InvalidArgumentError, r"no kernel takes these buffers.*out: None"),
    # --- select: passes ------------------------------------------------------------------------
    ("range-expect-nan", "range_pass",
     lambda: select.range_pass(F32, 0, 2**63, 1, 0, 10, 1, float("nan")), InvalidArgumentError,
     r"expect must be a fraction >= 0, got nan"),
    ("range-expect-negative", "range_pass",
     lambda: select.range_pass(F32, 0, 2**63, 1, 0, 10, 1, -1.0), InvalidArgumentError,
     r"expect must be a fraction >= 0"),
    ("range-none", "range_pass", lambda: select.range_pass(None, 0, 1, 1, 0, 10, 1),
     InvalidArgumentError, r"no kernel takes these buffers.*x: None"),
    ("mark-out-short", "mark_pass", lambda: select.mark_pass(F32, 0, 1, 1, 0, _u(63), 1),
     ShapeMismatchError, r"out holds 63 elements, the input 64"),
    ("collect-out-short", "mark_collect",
     lambda: select.mark_collect(F32, 0, 1, 1, 0, _u(63), _u(8, np.uint32), _u(8, np.uint32), 1),
     ShapeMismatchError, r"out holds 63 elements, the input 64"),
    ("collect-keys-narrow", "mark_collect",
     lambda: select.mark_collect(F32, 0, 1, 1, 0, _u(64), _u(8, np.uint16), _u(8, np.uint32), 1),
     InvalidArgumentError, r"keys must be a writeable contiguous 1-d uint32"),
    ("collect-keys-readonly", "mark_collect",
     lambda: select.mark_collect(F32, 0, 1, 1, 0, _u(64), np.broadcast_to(np.uint32(0), (8,)),
                                 _u(8, np.uint32), 1),
     InvalidArgumentError, r"keys must be a writeable"),
    ("collect-pos-short", "mark_collect",
     lambda: select.mark_collect(F32, 0, 1, 1, 0, _u(64), _u(8, np.uint32), _u(7, np.uint32), 1),
     ShapeMismatchError, r"pos holds 7 positions, keys 8"),
    ("gather-keys-short", "gather_marked",
     lambda: select.gather_marked(F32, _marked()[0], _marked()[1], 1, _u(9, np.uint32), 1),
     ShapeMismatchError, r"keys holds 9 keys, the counts add up to 10"),
    ("gather-keys-width", "gather_marked",
     lambda: select.gather_marked(F32, _marked()[0], _marked()[1], 1, _u(10, np.uint64), 1),
     InvalidArgumentError, r"keys must be 32-bit"),
    ("gather-counts-lie", "gather_marked",
     lambda: select.gather_marked(F32, _u(64), np.array([10], np.int64), 1, _u(10, np.uint32),
                                  1),
     InvalidArgumentError, r"task 0 holds 0 marked candidates, counts says 10"),
    ("gather-counts-negative", "gather_marked",
     lambda: select.gather_marked(F32, _u(64), np.array([-5, 5], np.int64), 1,
                                  _u(0, np.uint32), 1),
     InvalidArgumentError, r"counts\[0\] = -5 outside \[0, 64\]"),
    ("gather-counts-huge", "gather_marked",
     lambda: select.gather_marked(F32, _u(64), np.array([BIG, -BIG], np.int64), 1,
                                  _u(0, np.uint32), 1),
     InvalidArgumentError, r"counts\[0\] = \d+ outside \[0, 64\]"),
    ("gather-too-many-tasks", "gather_marked",
     lambda: select.gather_marked(F32, _u(64), np.zeros(65, np.int64), 1, _u(0, np.uint32), 1),
     InvalidShapeError, r"between 1 and 64 tasks, got 65"),
    ("gather-no-tasks", "gather_marked",
     lambda: select.gather_marked(F32, _u(64), np.zeros(0, np.int64), 1, _u(0, np.uint32), 1),
     InvalidShapeError, r"between 1 and 64 tasks, got 0"),
    ("gather-out-short", "gather_marked",
     lambda: select.gather_marked(F32, _u(10), np.zeros(1, np.int64), 1, _u(0, np.uint32), 1),
     ShapeMismatchError, r"out holds 10 elements, the input 64"),
    ("fix-keys-long", "fix_marked",
     lambda: select.fix_marked(_marked()[0], _marked()[1], _u(11, np.uint32), 5, 1, 1),
     ShapeMismatchError, r"keys holds 11 keys, the counts add up to 10"),
    ("fix-counts-beyond-out", "fix_marked",
     lambda: select.fix_marked(_u(8), np.array([BIG], np.int64), _u(0, np.uint32), 5, 1, 1),
     InvalidArgumentError, r"counts\[0\] = \d+ outside \[0, 8\]"),
    ("gather-pos-short", "gather_marked",
     lambda: select.gather_marked(F32, _marked()[0], _marked()[1], 1, _u(10, np.uint32), 1,
                                  _u(9, np.uint32)),
     ShapeMismatchError, r"pos holds 9 positions, keys 10"),
    ("fixpos-pos-short", "fix_positions",
     lambda: select.fix_positions(_u(64), _u(3, np.uint32), _u(4, np.uint32), 5, 1, 1),
     ShapeMismatchError, r"pos holds 3 positions, keys 4"),
    ("fixpos-none", "fix_positions",
     lambda: select.fix_positions(_u(64), None, _u(4, np.uint32), 5, 1, 1),
     InvalidArgumentError, r"'pos' must not be None"),
    ("hist-pass-short", "hist_pass",
     lambda: select.hist_pass(F32, 0, 0, 0, 1, 0, _u(100, np.int64), 1), ShapeMismatchError,
     r"hist must hold 65536 bins, got 100"),
    ("hist-pass-shift-wide", "hist_pass",
     lambda: select.hist_pass(F32, 32, 0, 0, 1, 0, _u(65536, np.int64), 1),
     InvalidArgumentError, r"shift 32 outside \[0, 32\)"),
    ("hist-pass-shift-negative", "hist_pass",
     lambda: select.hist_pass(F32, -1, 0, 0, 1, 0, _u(65536, np.int64), 1),
     InvalidArgumentError, r"shift -1 outside"),
    ("write-out-short", "write_pass", lambda: select.write_pass(F32, 0, 0, 1, _u(63), 1),
     ShapeMismatchError, r"out holds 63 elements, the input 64"),
    ("write-out-long", "write_pass", lambda: select.write_pass(F32, 0, BIG, 1, _u(65), 1),
     ShapeMismatchError, r"out holds 65 elements"),
    ("fill-out-short", "fill_pass", lambda: select.fill_pass(F32, 1, 1, 0, _u(1), 1),
     ShapeMismatchError, r"out holds 1 elements, the input 64"),
    # --- select: multi-tensor entry points -----------------------------------------------------
    ("threshold-sizes-lie", "threshold_masks",
     lambda: selection.threshold_masks([F32], [_u(128)], [128], 5, 1, 0, 1),
     ShapeMismatchError, r"source 0 holds 64 elements, sizes says 128"),
    ("threshold-out-short", "threshold_masks",
     lambda: selection.threshold_masks([F32], [_u(63)], [64], 5, 1, 0, 1),
     ShapeMismatchError, r"outs\[0\] must be a 1-d uint8 array of 64"),
    ("threshold-outs-missing", "threshold_masks",
     lambda: selection.threshold_masks([F32, F32], [_u(64)], [64, 64], 5, 1, 0, 1),
     ShapeMismatchError, r"2 sources but 1 outputs"),
    ("threshold-k-zero", "threshold_masks",
     lambda: selection.threshold_masks([F32], [_u(64)], [64], 0, 1, 0, 1),
     InvalidArgumentError, r"k=0 outside \[1, 64\]"),
    ("threshold-k-huge", "threshold_masks",
     lambda: selection.threshold_masks([F32], [_u(64)], [64], BIG, 1, 0, 1),
     InvalidArgumentError, r"k=\d+ outside \[1, 64\]"),
    ("threshold-mixed-dtypes", "threshold_masks",
     lambda: selection.threshold_masks([F32, F32.astype(np.float64)], [_u(64), _u(64)],
                                       [64, 64], 5, 1, 0, 1),
     InvalidArgumentError, r"one dtype"),
    ("threshold-source-2d", "threshold_masks",
     lambda: selection.threshold_masks([F32.reshape(8, 8)], [_u(64)], [64], 5, 1, 0, 1),
     InvalidShapeError, r"source 0 must be a 1-d C-contiguous"),
    ("threshold-source-strided", "threshold_masks",
     lambda: selection.threshold_masks([F32[::2]], [_u(32)], [32], 5, 1, 0, 1),
     InvalidShapeError, r"source 0 must be a 1-d C-contiguous"),
    ("threshold-source-int", "threshold_masks",
     lambda: selection.threshold_masks([np.arange(64)], [_u(64)], [64], 5, 1, 0, 1),
     InvalidArgumentError, r"dtype int64"),
    ("find-sizes-negative", "find_threshold",
     lambda: selection.find_threshold([F32, F32], [64, -64], 5, 1, 0, 1),
     InvalidArgumentError, r"sizes\[1\] = -64 is negative"),
    ("find-sizes-short", "find_threshold",
     lambda: selection.find_threshold([F32], [64, 64], 5, 1, 0, 1),
     ShapeMismatchError, r"1 sources but 2 sizes"),
    ("find-k-beyond", "find_threshold", lambda: selection.find_threshold([F32], [64], 65, 1, 0, 1),
     InvalidArgumentError, r"k=65 outside \[1, 64\]"),
    ("find-source-lies", "find_threshold",
     lambda: selection.find_threshold([SimpleNamespace(load=lambda sequential=False: F32[:10])],
                                      [64], 5, 1, 0, 1),
     ShapeMismatchError, r"source 0 holds 10 elements, sizes says 64"),
    ("find-source-not-array", "find_threshold",
     lambda: selection.find_threshold([list(F32)], [64], 5, 1, 0, 1),
     InvalidShapeError, r"source 0 must be a 1-d C-contiguous numpy array, got list"),
    ("count-in-none", "count_in", lambda: select.count_in(None, 0, 1),
     InvalidArgumentError, r"count_in: no kernel takes these buffers.*keys: None"),
    ("count-in-float", "count_in", lambda: select.count_in(F32, 0, 1),
     InvalidDTypeError, r"count_in"),
    # --- select: rows and blocks ---------------------------------------------------------------
    ("rows-out-short", "rows_mask",
     lambda: select.rows_mask(F32.reshape(8, 8), 3, 1, 0, np.zeros((8, 7), np.uint8), 1),
     ShapeMismatchError, r"out has shape \(8, 7\), the input \(8, 8\)"),
    ("rows-out-fewer-rows", "rows_mask",
     lambda: select.rows_mask(F32.reshape(8, 8), 3, 1, 0, np.zeros((7, 8), np.uint8), 1),
     ShapeMismatchError, r"out has shape \(7, 8\)"),
    ("rows-longer-than-the-budget", "rows_mask",
     lambda: select.rows_mask(np.zeros((2, 600_000), np.float32), 3, 1, 0,
                              np.zeros((2, 600_000), np.uint8), 1),
     InvalidArgumentError, r"do not fit the scratch budget"),
    ("rows-1d", "rows_mask", lambda: select.rows_mask(F32, 3, 1, 0, _u(64), 1),
     InvalidDTypeError, r"no kernel takes these buffers.*x: float32 array of shape \(64,\)"),
    ("blocks-out-too-big", "block_sums",
     lambda: select.block_sums(F32.reshape(8, 8), 4, 4, 0, np.zeros((3, 2)), 1),
     ShapeMismatchError, r"out \(3, 2\) of \(4, 4\) blocks does not tile the input \(8, 8\)"),
    ("blocks-zero-side", "block_sums",
     lambda: select.block_sums(F32.reshape(8, 8), 0, 4, 0, np.zeros((2, 2)), 1),
     InvalidArgumentError, r"block \(0, 4\) must have sides >= 1"),
    ("blocks-negative", "block_sums",
     lambda: select.block_sums(F32.reshape(8, 8), -4, -4, 0, np.zeros((-2 % 8, 2)), 1),
     InvalidArgumentError, r"sides >= 1"),
    ("expand-bmask-short", "expand_blocks",
     lambda: select.expand_blocks(np.zeros((1, 2), np.uint8), 4, 4, np.zeros((8, 8), np.uint8),
                                  1),
     ShapeMismatchError, r"bmask \(1, 2\) of \(4, 4\) blocks does not tile out \(8, 8\)"),
    ("expand-zero-side", "expand_blocks",
     lambda: select.expand_blocks(np.zeros((2, 2), np.uint8), 4, 0, np.zeros((8, 8), np.uint8),
                                  1),
     InvalidArgumentError, r"block \(4, 0\)"),
    # --- sparse24 kernels ----------------------------------------------------------------------
    ("s24-vals-short", "compress", lambda: _compress(vals=np.zeros((32, 15), np.uint16)),
     ShapeMismatchError, r"vals has shape \(32, 15\), expected \(32, 16\)"),
    ("s24-vals-fewer-rows", "compress", lambda: _compress(vals=np.zeros((1, 16), np.uint16)),
     ShapeMismatchError, r"vals has shape \(1, 16\)"),
    ("s24-mask-mode-no-keep", "compress", lambda: _compress(mode=1),
     InvalidArgumentError, r"mode 1 \(mask\) needs a keep buffer"),
    ("s24-keep-short", "compress",
     lambda: _compress(mode=1, keep=np.zeros((32, 16), np.uint8)), ShapeMismatchError,
     r"keep has shape \(32, 16\), expected \(32, 32\)"),
    ("s24-raw-no-codes", "compress", lambda: _compress(codes=None),
     InvalidArgumentError, r"raw layout needs a codes buffer"),
    ("s24-raw-codes-short", "compress", lambda: _compress(codes=np.zeros((32, 1), np.uint8)),
     ShapeMismatchError, r"codes has shape \(32, 1\), expected \(32, 4\)"),
    ("s24-bitmask-no-bits", "compress", lambda: _compress(layout=1, bits=None),
     InvalidArgumentError, r"bitmask layout needs a bits buffer"),
    ("s24-bitmask-bits-short", "compress",
     lambda: _compress(layout=1, bits=np.zeros((31, 4), np.uint8)), ShapeMismatchError,
     r"bits has shape \(31, 4\)"),
    ("s24-cutlass-meta-short", "compress", lambda: _compress(layout=0, meta=_u(2)),
     ShapeMismatchError, r"metadata holds 2 bytes, \(32, 32\) needs 128"),
    ("s24-cutlass-no-meta", "compress", lambda: _compress(layout=0, meta=None),
     InvalidArgumentError, r"cutlass layout needs a metadata buffer"),
    ("s24-cutlass-rows", "compress",
     lambda: _compress(layout=0, x=np.zeros((48, 32), np.uint16),
                       vals=np.zeros((48, 16), np.uint16), meta=_u(48 * 4 * 2)),
     InvalidShapeError, r"rows a multiple of 32 .* got \(48, 32\)"),
    ("s24-cutlass-meta-misaligned", "compress",
     lambda: _compress(layout=0, meta=_u(129)[1:]), InvalidArgumentError, r"not aligned"),
    ("s24-cols-not-groups", "compress",
     lambda: _compress(x=np.zeros((32, 30), np.uint16), vals=np.zeros((32, 15), np.uint16)),
     InvalidShapeError, r"30 columns are not whole groups of four"),
    ("s24-layout-code", "compress", lambda: _compress(layout=7), InvalidArgumentError,
     r"layout code must be 0 .* got 7"),
    ("s24-wide-code", "compress", lambda: _compress(wide=3), InvalidArgumentError,
     r"wide must be 0 .* got 3"),
    ("s24-pairs-not-cutlass", "compress", lambda: _compress(wide=2), InvalidArgumentError,
     r"wide=2 .* cutlass"),
    ("s24-pairs-16-bit-elements", "compress",
     lambda: _compress(layout=0, wide=2, meta=np.zeros(32 * 4 * 2, np.uint8)),
     InvalidArgumentError, r"wide=2 .* 32-bit elements"),
    ("s24-pairs-meta-short", "compress",
     lambda: _compress(layout=0, wide=2, x=np.zeros((32, 32), np.uint32),
                       vals=np.zeros((32, 16), np.uint32), meta=np.zeros(32 * 4 * 2 - 2, np.uint8)),
     ShapeMismatchError, r"metadata holds 254 bytes"),
    ("s24-pairs-cols", "compress",
     lambda: _compress(layout=0, wide=2, x=np.zeros((32, 24), np.uint32),
                       vals=np.zeros((32, 12), np.uint32), meta=np.zeros(32 * 3 * 2, np.uint8)),
     InvalidShapeError, r"float32 needs rows a multiple of 32"),
    ("s24-pairs-decompress-16-bit", "decompress",
     lambda: s24.decompress(np.zeros((32, 16), np.uint16), None, np.zeros(32 * 4 * 2, np.uint8),
                            0, 2, np.zeros((32, 32), np.uint16), 1),
     InvalidArgumentError, r"wide=2 .* 32-bit elements"),
    ("s24-pairs-decompress-meta-long", "decompress",
     lambda: s24.decompress(np.zeros((32, 16), np.uint32), None, np.zeros(32 * 4 * 2 + 2, np.uint8),
                            0, 2, np.zeros((32, 32), np.uint32), 1),
     ShapeMismatchError, r"metadata holds 258 bytes"),
    ("s24-mode-code", "compress", lambda: _compress(mode=-1), InvalidArgumentError,
     r"mode must be 0 .* got -1"),
    ("s24-x-none", "compress", lambda: _compress(x=None), InvalidArgumentError,
     r"no kernel takes these buffers.*x: None"),
    ("s24-vals-dtype", "compress", lambda: _compress(vals=np.zeros((32, 16), np.uint32)),
     InvalidDTypeError, r"dtype|signature"),
    ("s24d-vals-short", "decompress", lambda: _decompress(vals=np.zeros((32, 8), np.uint16)),
     ShapeMismatchError, r"vals has shape \(32, 8\), expected \(32, 16\)"),
    ("s24d-codes-short", "decompress", lambda: _decompress(codes=np.zeros((4, 4), np.uint8)),
     ShapeMismatchError, r"codes has shape \(4, 4\)"),
    ("s24d-bitmask-none", "decompress", lambda: _decompress(layout=1, codes=None),
     InvalidArgumentError, r"bitmask layout needs a codes buffer"),
    ("s24d-meta-1x1", "decompress", lambda: _decompress(layout=0, meta=_u(2)),
     ShapeMismatchError, r"metadata holds 2 bytes, \(32, 32\) needs 128"),
    ("s24d-meta-wide", "decompress", lambda: _decompress(layout=0, cols=64, wide=1, meta=_u(64)),
     ShapeMismatchError, r"metadata holds 64 bytes, \(32, 64\) needs 256"),
    ("s24d-cutlass-cols", "decompress",
     lambda: _decompress(layout=0, cols=32, wide=1, meta=_u(64)), InvalidShapeError,
     r"rows a multiple of 16 and columns a multiple of 64, got \(32, 32\)"),
    ("s24d-out-none", "decompress", lambda: _decompress(out=None), InvalidArgumentError,
     r"'out' must not be None"),
    # --- the public Sparse24Tensor constructor (the original crash: 1x1 metadata) -------------
    ("tensor-cutlass-meta-1x1", "Sparse24Tensor",
     _tensor("cutlass", metadata=np.zeros((1, 1), np.int16)), ShapeMismatchError,
     r"metadata has shape \(1, 1\).*needs shape \(64, 4\)"),
    ("tensor-raw-meta-1x1", "Sparse24Tensor", _tensor("raw", metadata=np.zeros((1, 1), np.uint8)),
     ShapeMismatchError, r"metadata has shape \(1, 1\).*needs shape \(64, 8\)"),
    ("tensor-bitmask-1x1", "Sparse24Tensor", _tensor("bitmask", bitmask=np.zeros((1, 1), np.uint8)),
     ShapeMismatchError, r"bitmask has shape \(1, 1\).*needs shape \(64, 8\)"),
    ("tensor-values-short", "Sparse24Tensor",
     _tensor("raw", values=np.zeros((64, 2), np.float16)), ShapeMismatchError,
     r"values has shape \(64, 2\).*needs \(64, 32\)"),
    ("tensor-values-width", "Sparse24Tensor",
     _tensor("raw", values=np.zeros((64, 32), np.float32)), InvalidDTypeError,
     r"float16 values take 2 byte"),
    ("tensor-padded-too-small", "Sparse24Tensor", _tensor("raw", padded_shape=(32, 64)),
     InvalidShapeError, r"padded_shape \(32, 64\) must cover shape \(64, 64\)"),
    ("tensor-padded-huge", "Sparse24Tensor", _tensor("raw", padded_shape=(BIG, 64)),
     ShapeMismatchError, r"values has shape \(64, 32\)"),
    ("tensor-shape-negative", "Sparse24Tensor", _tensor("raw", shape=(64, -64)),
     InvalidShapeError, r"negative dimension"),
    ("tensor-metadata-in-bitmask", "Sparse24Tensor",
     _tensor("bitmask", metadata=np.zeros((64, 8), np.uint8)), LayoutError,
     r"bitmask layout has no metadata"),
    ("tensor-cutlass-no-meta", "Sparse24Tensor", _tensor("cutlass", metadata=None),
     LayoutError, r"cutlass layout needs metadata"),
    ("tensor-layout", "Sparse24Tensor", _tensor("csr"), InvalidArgumentError,
     r"layout must be one of"),
    ("tensor-dtype", "Sparse24Tensor", _tensor("raw", dtype="float64"), InvalidDTypeError,
     r"dtype must be one of"),
    # --- sparsegpt ------------------------------------------------------------------------------
    ("sg-check-not-square", "check_hessian", lambda: sg.check_hessian(_f32((4, 3)), 1e-3, 1),
     ShapeMismatchError, r"must be square, got shape \(4, 3\)"),
    ("sg-check-none", "check_hessian", lambda: sg.check_hessian(None, 1e-3, 1),
     InvalidArgumentError, r"check_hessian: no kernel takes these buffers .*h: None"),
    ("sg-load-out-small", "load_reversed",
     lambda: sg.load_reversed(_f32((4, 4)), np.zeros((3, 3)), 0.1, 1.0, 1), ShapeMismatchError,
     r"output of the same shape"),
    ("sg-load-out-f32", "load_reversed",
     lambda: sg.load_reversed(_f32((4, 4)), _f32((4, 4)), 0.1, 1.0, 1), InvalidDTypeError,
     r"load_reversed"),
    ("sg-reverse-count-big", "reverse_narrow",
     lambda: sg.reverse_narrow(np.zeros(8), 9, True, 1), InvalidArgumentError,
     r"count 9 is outside the buffer of 8"),
    ("sg-reverse-count-negative", "reverse_narrow",
     lambda: sg.reverse_narrow(np.zeros(8), -1, True, 1), InvalidArgumentError,
     r"count -1 is outside"),
    ("sg-saliency-cols", "saliency",
     lambda: sg.saliency(_f32((4, 8)), 4, 12, _f32((8, 8)), _f32((4, 8)), _NONE, 1),
     ShapeMismatchError, r"columns \[4, 12\) of weights with 8 columns"),
    ("sg-saliency-factor", "saliency",
     lambda: sg.saliency(_f32((4, 8)), 0, 8, _f32((4, 4)), _f32((4, 8)), _NONE, 1),
     ShapeMismatchError, r"factor of shape \(4, 4\)"),
    ("sg-saliency-out", "saliency",
     lambda: sg.saliency(_f32((4, 8)), 0, 8, _f32((8, 8)), _f32((4, 4)), _NONE, 1),
     ShapeMismatchError, r"out has shape \(4, 4\), expected \(4, 8\)"),
    ("sg-block-cols", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 6, 10,
                            np.ones((4, 4), np.uint8), 0, 0, _NONE, np.ones((4, 8), np.uint8), 1),
     ShapeMismatchError, r"columns \[6, 10\) of 8"),
    ("sg-block-err", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 7)), _f32((8, 8)), 0, 4,
                            np.ones((4, 4), np.uint8), 0, 0, _NONE, np.ones((4, 8), np.uint8), 1),
     ShapeMismatchError, r"err and keep must have the weights' shape"),
    ("sg-block-keep", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 0, 4,
                            np.ones((4, 3), np.uint8), 0, 0, _NONE, np.ones((4, 8), np.uint8), 1),
     ShapeMismatchError, r"block_keep has shape \(4, 3\), expected \(4, 4\)"),
    ("sg-block-m-huge", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 0, 4,
                            np.ones((0, 0), np.uint8), 2, 100000, _NONE, np.ones((4, 8), np.uint8), 1),
     InvalidArgumentError, r"N:M with 0 <= N <= M <= 256"),
    ("sg-block-n-above-m", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 0, 4,
                            np.ones((0, 0), np.uint8), 5, 4, _NONE, np.ones((4, 8), np.uint8), 1),
     InvalidArgumentError, r"got 5:4"),
    ("sg-block-groups", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 2, 6,
                            np.ones((0, 0), np.uint8), 2, 4, _NONE, np.ones((4, 8), np.uint8), 1),
     InvalidArgumentError, r"do not start and end on groups of 4"),
    ("sg-saliency-forced", "saliency",
     lambda: sg.saliency(_f32((4, 8)), 0, 8, _f32((8, 8)), _f32((4, 8)),
                         np.ones((4, 7), np.uint8), 1),
     ShapeMismatchError, r"forced has shape \(4, 7\), expected \(4, 8\) or \(0, 0\)"),
    ("sg-block-forced", "prune_block",
     lambda: sg.prune_block(_f32((4, 8)), _f32((4, 8)), _f32((8, 8)), 0, 4,
                            np.ones((4, 4), np.uint8), 0, 0, np.ones((3, 8), np.uint8),
                            np.ones((4, 8), np.uint8), 1),
     ShapeMismatchError, r"forced has shape \(3, 8\)"),
    ("sg-narrow-short", "narrow16",
     lambda: sg.narrow16(F32, np.zeros(63, np.uint16), 1, 1), ShapeMismatchError,
     r"out holds 63 values, w 64"),
    ("sg-narrow-fmt", "narrow16", lambda: sg.narrow16(F32, np.zeros(64, np.uint16), 7, 1),
     InvalidArgumentError, r"unknown 16-bit format 7"),
    # --- _openmp ---------------------------------------------------------------------------------
    ("work-threads-zero", "work_threads", lambda: _openmp.work_threads(0, 10, 10),
     InvalidArgumentError, r"n_threads must be >= 1, got 0"),
    ("work-negative", "work_threads", lambda: _openmp.work_threads(2, -1, 10),
     InvalidArgumentError, r"work must be >= 0"),
    ("team-zero", "team_size", lambda: _openmp.team_size(0), InvalidArgumentError,
     r"n_threads must be >= 1, got 0"),
    ("team-huge", "team_size", lambda: _openmp.team_size(HUGE_INT), InvalidArgumentError,
     r"out of range"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_call_raises_a_typed_error(case):
    _, _, call, exc, pattern = case
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, PruningError)
    assert isinstance(info.value, (ValueError, TypeError))
    assert re.search(pattern, str(info.value)), str(info.value)


# Entry points that take no buffer (nothing to attack), and the cases' names for the others.
NO_BUFFERS = {"openmp_enabled", "max_threads", "forked_serial", "guard", "simd"}


def test_every_entry_point_is_in_the_catalogue():
    covered = {c[1] for c in CASES}
    for mod in (apply, nm, select, stats, s24, sg, _openmp, jsonscan):
        for name, value in vars(mod).items():
            if name.startswith("__") or isinstance(value, type) or not callable(value):
                continue
            if getattr(value, "__module__", None) not in (mod.__name__,
                                                          "aprender._kernels._guard"):
                continue
            assert name in covered or name in NO_BUFFERS, f"{mod.__name__}.{name} has no case"


def test_writes_stay_inside_their_buffers():
    """Outputs carved out of a larger buffer: the bytes around them never change."""
    guard = np.full(64 + 128 + 64, 0xA5, np.uint8)
    out = guard[64:192]
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    select.write_pass(x, 0, 5, 1, out, 4)
    select.fill_pass(x, 1, 1, 0, out, 4)
    assert selection.threshold_masks([x], [out], [128], 50, 1, 0, 4) == 0
    nm.nm_mask(x, 1, 128, 1, 2, 4, 1, 0, out, 4)
    big = np.full(16 + 8 * 16 + 16, 0xA5, np.uint8)
    select.rows_mask(x.reshape(8, 16), 5, 1, 0, big[16:144].reshape(8, 16), 4)
    keys = np.full(3 + 10 + 3, 7, np.uint32)
    pos = np.full(3 + 10 + 3, 7, np.uint32)
    out2, counts, lo, hi = _marked()
    select.gather_marked(F32, out2, counts, 1, keys[3:13], 4, pos[3:13])
    np.testing.assert_array_equal(pos[3:13], np.arange(20, 30))
    # positions beyond the mask are skipped, never written
    small = np.full(16 + 8 + 16, 0xA5, np.uint8)
    select.fix_positions(small[16:24], np.array([0, 7, 8, 2**31, 2**32 - 1], np.uint32),
                         np.arange(5, dtype=np.uint32), 2, 0, 4)
    assert np.all(small[:16] == 0xA5) and np.all(small[24:] == 0xA5)
    assert np.all(pos[:3] == 7) and np.all(pos[13:] == 7)
    assert np.all(guard[:64] == 0xA5) and np.all(guard[192:] == 0xA5)
    assert np.all(big[:16] == 0xA5) and np.all(big[144:] == 0xA5)
    assert np.all(keys[:3] == 7) and np.all(keys[13:] == 7)


def test_huge_caps_and_budgets_allocate_by_the_work():
    """A cap or budget of 2**62 must not turn into a 2**62-sized allocation."""
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    below, inside, bad, cands = select.range_pass(x, 0, 2**64 - 1, 1, 0, BIG, 4, 1.0)
    assert (below, inside, bad) == (0, 100_000, 0) and cands.shape == (100_000,)
    t, _, _, method = selection.find_threshold([x], [x.size], 50_000, 1, 0, 4, BIG)
    assert method == "sample"
    assert selection.threshold_masks([x], [_u(x.size)], [x.size], 50_000, 1, 0, 4, BIG) == 0


def test_negative_thread_counts_run_serial():
    x = np.random.default_rng(2).standard_normal(200_000).astype(np.float32)
    out1, out2 = _u(x.size), _u(x.size)
    select.write_pass(x, 2**31 + 10, 7, 1, out1, -7)
    select.write_pass(x, 2**31 + 10, 7, 1, out2, 1)
    np.testing.assert_array_equal(out1, out2)
    assert _openmp.work_threads(1, 10**9, 10**9) == 1
