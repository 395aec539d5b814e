"""Criteria for structured pruning: which layers, MLP channels, KV head groups and experts go.

Every function here is pure numpy (no torch, no file I/O): it takes weights and calibration
statistics already in memory and returns scores or orders; :func:`keep_uniform` turns scores
into the kept indices of every layer.

Criteria (the defaults, ``DEFAULT_CRITERIA``):

* **layers** — ``"block-influence"``: ShortGPT's block influence (Men et al. 2024, "ShortGPT:
  Layers in Large Language Models are More Redundant Than You Expect"),
  ``BI = 1 - mean cos(h_in, h_out)`` over calibration tokens (:class:`aprender.pruning.BlockStats`
  from ``aprender calibrate``); the least influential blocks go first, ties to the lower index.
  ``"last"`` drops the last blocks first (the naive baseline; needs no statistics).
* **mlp** (intermediate channels) — ``"activation"``: channel ``j`` of a down projection
  ``W_down`` (hidden, intermediate) scores ``sqrt(ss_j) * ||W_down[:, j]||_2``, ``ss_j`` being
  the sum of squares of the down projection's input ``j`` over the calibration tokens
  (``ActivationStats.sum_squares``): the norm of the channel's contribution to the output,
  summed over tokens in quadrature — Wanda-sp / FLAP's activation-aware structured score (An et
  al. 2024, "Fluctuation-based Adaptive Structured Pruning"; Sun et al. 2023, Wanda).  Without
  calibration it falls back to ``||W_down[:, j]||_2`` alone (the same score with every channel's
  input norm taken equal; ``used_calibration`` is then False, so reports can say so).
  ``"magnitude"`` is that fallback always.
* **heads** (KV groups, GQA-aware) — ``"activation"``: the same per-column score at the output
  projection's input (column ``h * head_dim + d`` of ``W_o`` belongs to query head ``h``),
  summed over the query heads that share KV group ``g`` (heads ``g * r`` to ``g * r + r - 1``,
  ``r = n_heads / n_kv``, the order transformers' ``repeat_kv`` uses).  ``"magnitude"``: the
  column norms alone.
* **experts** — ``"reap"``: REAP's router-weighted expert activation norm (Lasby et al. 2025,
  "REAP the Experts"): the mean over the tokens routed to the expert of ``gate weight *
  ||expert output||_2`` (:class:`aprender.pruning.ExpertStats`); an expert no token reached
  scores 0.

The registry: ``CRITERIA[axis][name]`` is a function with that axis's signature —

* ``"layers"``: ``fn(block_stats, prefixes) -> list[int]`` (indices into prefixes, the first
  to remove first);
* ``"mlp"``: ``fn(w_down, input_sq_norms=None) -> (scores, used_calibration)``;
* ``"heads"``: ``fn(w_o, n_heads, n_kv, head_dim, input_sq_norms=None) -> (scores,
  used_calibration)``;
* ``"experts"``: ``fn(expert_stats, prefixes) -> scores``;

scores being float64 arrays where higher means more important.  Add one with
:func:`register_criterion` and look one up with :func:`get_criterion` (an unknown name is an
InvalidArgumentError listing the known ones).

Memory: weight scores read 16-bit weights (``aprender.Bits16``, ml_dtypes, torch) a block of
rows at a time, decoding each block to float32 and summing squares in float64, so no float64
copy of a whole tensor is made.
"""
from collections.abc import Mapping

import numpy as np

from .._validation import (as_array, as_floats, check_int, check_sparsity, decode16,
                           prune_count, raise_nonfinite, resolve_threads, short_repr)
from ..errors import (CalibrationError, InvalidArgumentError, InvalidShapeError,
                      InvalidSparsityError, ShapeMismatchError)
from ..io.files import display
from ..pruning.importance import _weights_of
from ..pruning.selection import ArraySource, _is_finite, select_rows

__all__ = ["mlp_channel_scores", "kv_group_scores", "layer_order", "layer_order_last",
           "expert_scores", "keep_uniform", "kept_count", "column_sq_norms", "CRITERIA",
           "DEFAULT_CRITERIA", "register_criterion", "get_criterion"]

_CHUNK = 1 << 20  # elements of one block of rows decoded at a time


def _weights(w, name):
    """A 2-D weight as a validated Floats, finite."""
    f = as_floats(_weights_of(w), name)
    if f.array.ndim != 2:
        raise InvalidShapeError(f"{name} must be a 2-D weight (out_features, in_features), got "
                                f"shape {f.shape}")
    if f.size and not _is_finite(f.kernel.reshape(-1), f.inf16, resolve_threads(None)):
        raise_nonfinite(f, name)
    return f


def column_sq_norms(w, name="weights"):
    """float64 (in_features,): ``||w[:, j]||_2²`` of a 2-D weight (out, in) of any float dtype,
    read a block of rows at a time (16-bit rows decoded to float32, squares summed in float64;
    exact squares, sums in a fixed order)."""
    f = _weights(w, name)
    rows, cols = f.shape
    out = np.zeros(cols, dtype=np.float64)
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        blk = f.kernel[r0:r0 + step]
        blk = decode16(blk, f.fmt) if f.fmt else blk
        b64 = blk.astype(np.float64)
        out += np.einsum("ij,ij->j", b64, b64)
    return out


def _sq_norms(input_sq_norms, size, what):
    """The calibration sums of squares as a float64 (size,) array, checked."""
    from ..pruning.calibration import ActivationStats

    if isinstance(input_sq_norms, ActivationStats):
        input_sq_norms = input_sq_norms.sum_squares
    ss = as_array(input_sq_norms, f"{what} input_sq_norms")
    if ss.dtype.kind not in "fiu":  # bools, strings, objects
        raise CalibrationError(f"{what}: input_sq_norms must be real numbers (sums of squares), "
                               f"got dtype {ss.dtype}")
    if ss.ndim != 1:
        raise ShapeMismatchError(f"{what}: input_sq_norms must be 1-D, got shape {ss.shape}")
    if ss.size != size:
        raise ShapeMismatchError(f"{what}: input_sq_norms has {ss.size} entries but the weight "
                                 f"has {size} input columns")
    ss = ss.astype(np.float64)
    bad = ~np.isfinite(ss) | (ss < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise CalibrationError(f"{what}: input_sq_norms[{i}] is {float(ss[i])!r}; sums of "
                               "squares are finite and >= 0")
    return ss


def _column_scores(w, input_sq_norms, what):
    """Per input column: sqrt(ss_j) * ||w[:, j]||_2 (with calibration) or ||w[:, j]||_2."""
    norms = np.sqrt(column_sq_norms(w, what))
    if input_sq_norms is None:
        return norms, False
    return np.sqrt(_sq_norms(input_sq_norms, norms.size, what)) * norms, True


def mlp_channel_scores(w_down, input_sq_norms=None):
    """Scores of the MLP intermediate channels from the down projection ``w_down`` (hidden,
    intermediate): ``sqrt(ss_j) * ||w_down[:, j]||_2`` with ``input_sq_norms`` (the down
    projection's input sums of squares, length intermediate, or its ActivationStats), else
    ``||w_down[:, j]||_2``.  Returns ``(float64 scores, used_calibration)``."""
    return _column_scores(w_down, input_sq_norms, "mlp_channel_scores")


def mlp_magnitude_scores(w_down, input_sq_norms=None):
    """``||w_down[:, j]||_2`` whatever ``input_sq_norms`` is (the ``"magnitude"`` criterion)."""
    return _column_scores(w_down, None, "mlp_channel_scores")


def _heads(w_o, n_heads, n_kv, head_dim):
    n_heads = check_int(n_heads, "n_heads", minimum=1)
    n_kv = check_int(n_kv, "n_kv", minimum=1)
    head_dim = check_int(head_dim, "head_dim", minimum=1)
    if n_heads % n_kv:
        raise InvalidArgumentError(f"n_heads ({n_heads}) must be a multiple of n_kv ({n_kv}): "
                                   "every key/value group serves the same number of query heads")
    return n_heads, n_kv, head_dim


def _group_sum(cols, n_heads, n_kv, head_dim):
    # columns h * head_dim + d; heads g * r .. g * r + r - 1 form group g: contiguous blocks
    return cols.reshape(n_kv, (n_heads // n_kv) * head_dim).sum(axis=1)


def kv_group_scores(w_o, n_heads, n_kv, head_dim, input_sq_norms=None):
    """Scores of the ``n_kv`` key/value head groups from the attention output projection
    ``w_o`` (hidden, n_heads * head_dim): the sum, over the group's query heads and their
    dimensions, of ``sqrt(ss_c) * ||w_o[:, c]||_2`` (``||w_o[:, c]||_2`` without
    ``input_sq_norms``).  Returns ``(float64 scores[n_kv], used_calibration)``."""
    n_heads, n_kv, head_dim = _heads(w_o, n_heads, n_kv, head_dim)
    cols, used = _column_scores(w_o, input_sq_norms, "kv_group_scores")
    if cols.size != n_heads * head_dim:
        raise ShapeMismatchError(f"kv_group_scores: the output projection has {cols.size} input "
                                 f"columns, but n_heads x head_dim = {n_heads} x {head_dim} = "
                                 f"{n_heads * head_dim}")
    return _group_sum(cols, n_heads, n_kv, head_dim), used


def kv_group_magnitude_scores(w_o, n_heads, n_kv, head_dim, input_sq_norms=None):
    """:func:`kv_group_scores` without calibration whatever ``input_sq_norms`` is."""
    return kv_group_scores(w_o, n_heads, n_kv, head_dim, None)


def _prefixes(prefixes, what):
    if isinstance(prefixes, (str, bytes)) or not hasattr(prefixes, "__iter__"):
        raise InvalidArgumentError(f"{what}: prefixes must be a sequence of names, got "
                                   f"{type(prefixes).__name__} {short_repr(prefixes)}")
    out = list(prefixes)
    for p in out:
        if not isinstance(p, str):
            raise InvalidArgumentError(f"{what}: every prefix must be a string, got "
                                       f"{type(p).__name__} {short_repr(p)}")
    if len(set(out)) != len(out):
        dup = next(p for i, p in enumerate(out) if p in out[:i])
        raise InvalidArgumentError(f"{what}: prefix {short_repr(display(dup))} is listed twice")
    return out


def _stats_map(stats, attr, what):
    """A {prefix: stats} mapping; a CalibrationContext gives its ``attr`` mapping."""
    from ..pruning.calibration import CalibrationContext

    if isinstance(stats, CalibrationContext):
        stats = getattr(stats, attr)
    if not isinstance(stats, Mapping):
        raise InvalidArgumentError(f"{what} needs a mapping of prefixes to statistics (or a "
                                   f"CalibrationContext), got {type(stats).__name__}")
    return stats


def _name(p):
    """A layer or prefix for a message: names from files escaped, then cut."""
    return short_repr(display(p) if isinstance(p, str) else p)


def layer_order(block_stats, prefixes):
    """Indices into ``prefixes`` (the blocks' checkpoint prefixes, e.g. ``"model.layers.3"``),
    least influential block first: by ShortGPT's block influence ``BI = 1 - mean cos(h_in,
    h_out)`` (``block_stats``: {prefix: BlockStats}, or a CalibrationContext), ties to the lower
    index.  A block with no statistics or no tokens is a CalibrationError naming it."""
    from ..pruning.calibration import BlockStats

    prefixes = _prefixes(prefixes, "layer_order")
    stats = _stats_map(block_stats, "block_stats", "layer_order")
    keys = []
    for i, p in enumerate(prefixes):
        s = stats.get(p)
        if s is None or not isinstance(s, BlockStats) or s.tokens == 0:
            why = "has no statistics" if s is None else (
                "saw no tokens" if isinstance(s, BlockStats) else
                f"has {type(s).__name__} instead of BlockStats")
            raise CalibrationError(f"block {_name(p)} {why}: layer removal needs block "
                                   "statistics from 'aprender calibrate'")
        keys.append((s.influence, i))
    return [i for _, i in sorted(keys)]


def layer_order_last(block_stats, prefixes):
    """Indices into ``prefixes`` from the last to the first (the ``"last"`` criterion: drop
    the last blocks; ``block_stats`` is not read and may be None)."""
    return list(range(len(_prefixes(prefixes, "layer_order_last"))))[::-1]


def expert_scores(expert_stats, prefixes):
    """REAP scores (float64, one per prefix, e.g. ``"model.layers.3.mlp.experts.7"``):
    ``ExpertStats.reap``, the mean router-weighted output norm over the tokens routed to the
    expert, 0 for an expert no token reached.  ``expert_stats``: {prefix: ExpertStats}, or a
    CalibrationContext.  A missing expert is a CalibrationError naming it."""
    from ..pruning.calibration import ExpertStats

    prefixes = _prefixes(prefixes, "expert_scores")
    stats = _stats_map(expert_stats, "expert_stats", "expert_scores")
    out = np.zeros(len(prefixes), dtype=np.float64)
    for i, p in enumerate(prefixes):
        s = stats.get(p)
        if not isinstance(s, ExpertStats):
            why = "has no statistics" if s is None else \
                f"has {type(s).__name__} instead of ExpertStats"
            raise CalibrationError(f"expert {_name(p)} {why}: expert removal needs REAP "
                                   "statistics from 'aprender calibrate'")
        out[i] = s.reap
    return out


def kept_count(width, fraction, round_to):
    """How many of ``width`` items :func:`keep_uniform` keeps: ``width - round(fraction *
    width)`` (the nearest integer, halves down, as every count in aprender), at least 1, then
    rounded UP to a multiple of ``round_to`` — rounding never removes more than asked — and
    capped at ``width`` (so a width that is not a multiple of ``round_to`` can come back
    whole).  ``fraction`` in [0, 1)."""
    width = check_int(width, "width", minimum=0)
    fraction = check_sparsity(fraction, "fraction")
    if fraction == 1.0:
        raise InvalidSparsityError("fraction must be below 1: removing every channel, head or "
                                   "expert of a layer leaves nothing to export")
    round_to = check_int(round_to, "round_to", minimum=1)
    if width == 0:
        return 0
    kept = max(1, width - prune_count(fraction, width))
    return min(width, -(-kept // round_to) * round_to)


def keep_uniform(scores_per_layer, fraction, round_to):
    """``{layer: sorted kept indices (intp)}``: the same count kept in every layer
    (:func:`kept_count` of the common width), the highest scores of each layer; among equal
    scores the lower index goes first (aprender's tie rule), so the result is deterministic.
    ``scores_per_layer``: {layer: 1-D real scores}, every layer of the same width (uniform
    widths are what stock loaders read); NaN scores are refused."""
    if not isinstance(scores_per_layer, Mapping):
        raise InvalidArgumentError(f"keep_uniform needs a mapping of layers to scores, got "
                                   f"{type(scores_per_layer).__name__}")
    layers = list(scores_per_layer)
    rows = []
    for layer in layers:
        s = as_array(scores_per_layer[layer], f"scores of layer {_name(layer)}")
        if s.dtype.kind in "iub":
            if s.dtype.kind == "b":
                raise InvalidArgumentError(f"scores of layer {_name(layer)} must be "
                                           "numbers, got booleans")
            s = s.astype(np.float64)
        f = as_floats(s, f"scores of layer {_name(layer)}")
        if f.size and not _is_finite(f.kernel.reshape(-1), f.inf16, resolve_threads(None)):
            raise_nonfinite(f, f"scores of layer {_name(layer)}")
        s = f.array
        if s.ndim != 1:
            raise InvalidShapeError(f"scores of layer {_name(layer)} must be 1-D, got "
                                    f"shape {s.shape}")
        if rows and s.size != rows[0].size:
            raise ShapeMismatchError(f"keep_uniform keeps the same width in every layer, but "
                                     f"layer {_name(layers[0])} has {rows[0].size} scores "
                                     f"and layer {_name(layer)} {s.size}")
        rows.append(s)
    width = rows[0].size if rows else 0
    kept = kept_count(width, fraction, round_to)
    if not rows:
        return {}
    if width == 0:
        return {layer: np.zeros(0, dtype=np.intp) for layer in layers}
    stacked = np.stack([r.astype(np.float64) for r in rows])
    keep = np.empty(stacked.size, dtype=np.uint8)
    nt = resolve_threads(None)
    src = ArraySource(as_floats(stacked, "scores"), "scores")
    select_rows(src, keep, len(rows), width, width - kept, 0, nt)
    keep = keep.reshape(len(rows), width).astype(bool)
    return {layer: np.flatnonzero(keep[i]).astype(np.intp) for i, layer in enumerate(layers)}


CRITERIA = {
    "layers": {"block-influence": layer_order, "last": layer_order_last},
    "mlp": {"activation": mlp_channel_scores, "magnitude": mlp_magnitude_scores},
    "heads": {"activation": kv_group_scores, "magnitude": kv_group_magnitude_scores},
    "experts": {"reap": expert_scores},
}
DEFAULT_CRITERIA = {"layers": "block-influence", "mlp": "activation", "heads": "activation",
                    "experts": "reap"}


def register_criterion(axis, name, fn, *, replace=False):
    """Add ``fn`` as criterion ``name`` of ``axis`` ("layers", "mlp", "heads", "experts"),
    with that axis's signature (see the module documentation).  An existing name needs
    ``replace=True``."""
    if axis not in CRITERIA:
        raise InvalidArgumentError(f"unknown axis {short_repr(axis)}; the axes are "
                                   f"{', '.join(CRITERIA)}")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a criterion's name must be a non-empty string, got "
                                   f"{short_repr(name)}")
    if not callable(fn):
        raise InvalidArgumentError(f"criterion {name!r} must be callable, got "
                                   f"{type(fn).__name__}")
    if name in CRITERIA[axis] and not replace:
        raise InvalidArgumentError(f"criterion {name!r} of axis {axis!r} exists; pass "
                                   "replace=True to replace it")
    CRITERIA[axis][name] = fn


def get_criterion(axis, name=None):
    """The criterion function ``name`` of ``axis`` (the axis's default for None)."""
    if axis not in CRITERIA:
        raise InvalidArgumentError(f"unknown axis {short_repr(axis)}; the axes are "
                                   f"{', '.join(CRITERIA)}")
    name = DEFAULT_CRITERIA[axis] if name is None else name
    try:
        return CRITERIA[axis][name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown {axis} criterion {short_repr(name)}; known: "
                                   f"{', '.join(sorted(CRITERIA[axis]))}") from None
