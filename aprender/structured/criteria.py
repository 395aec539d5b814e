"""Criteria for structured pruning: which layers, MLP channels, KV head groups and experts go.

The simplest correct versions, behind the signatures the shrink front end calls (a fuller
implementation replaces the bodies, not the signatures).  Scores are float64, higher means more
important; ties go by index (the lower index is kept first, removed last).

* layers: ShortGPT's block influence ``BI = 1 - mean cos(h_in, h_out)`` (Men et al. 2024),
  least influential first;
* MLP channels: ``||X_j||_2 * ||W_down[:, j]||_2`` (Wanda-sp / FLAP's activation-aware score),
  or ``||W_down[:, j]||_2`` without calibration (magnitude only: ``used_calibration`` False);
* KV groups: the same column score at the output projection's input, summed over the group's
  query heads;
* experts: REAP's mean router-weighted expert output norm (Lasby et al. 2025).
"""
import numpy as np

from .._validation import (BF16, F16, Bits16, check_int, check_sparsity, decode16, prune_count,
                           short_repr)
from ..errors import CalibrationError, InvalidArgumentError, InvalidSparsityError

__all__ = ["mlp_channel_scores", "kv_group_scores", "layer_order", "expert_scores",
           "keep_uniform", "kept_count"]


_ROWS = 256  # rows decoded to float64 at a time (no float64 copy of a whole weight)


def _column_sq_norms(w):
    """float64 ``||w[:, j]||²`` of a 2-D float weight (numpy or aprender.Bits16)."""
    fmt = None
    if isinstance(w, Bits16):
        fmt, w = (BF16 if w.format == "bfloat16" else F16), w.bits
    else:
        w = np.asarray(w)
    if w.ndim != 2:
        raise InvalidArgumentError(f"expected a 2-D weight, got shape {w.shape}")
    acc = np.zeros(w.shape[1], dtype=np.float64)
    for a in range(0, w.shape[0], _ROWS):
        blk = w[a:a + _ROWS]
        blk = (decode16(blk, fmt) if fmt else blk).astype(np.float64)
        acc += np.einsum("ij,ij->j", blk, blk)
    return acc


def _columns(w, input_sq_norms):
    score = np.sqrt(_column_sq_norms(w))
    if input_sq_norms is None:
        return score, False
    ss = np.asarray(input_sq_norms, dtype=np.float64).reshape(-1)
    if ss.shape[0] != score.shape[0]:
        raise CalibrationError(f"calibration holds {ss.shape[0]} input norms for a weight of "
                               f"{score.shape[0]} columns")
    return score * np.sqrt(ss), True


def mlp_channel_scores(w_down, input_sq_norms=None):
    """(scores of the intermediate channels, used_calibration) from the down projection."""
    return _columns(w_down, input_sq_norms)


def kv_group_scores(w_o, n_heads, n_kv, head_dim, input_sq_norms=None):
    """(scores of the n_kv key/value groups, used_calibration) from the output projection."""
    cols, used = _columns(w_o, input_sq_norms)
    if cols.size != n_heads * head_dim or n_heads % n_kv:
        raise InvalidArgumentError(f"an output projection of {cols.size} inputs does not hold "
                                   f"{n_heads} heads of {head_dim} in {n_kv} groups")
    return cols.reshape(n_kv, -1).sum(axis=1), used


def _stats(stats, attr):
    return getattr(stats, attr) if hasattr(stats, attr) else dict(stats or {})


def layer_order(block_stats, prefixes):
    """Indices into ``prefixes``, least influential block first (ties by index)."""
    stats = _stats(block_stats, "block_stats")
    keys = []
    for i, p in enumerate(prefixes):
        s = stats.get(p)
        if s is None or not s.tokens:
            raise CalibrationError(f"block {short_repr(p)} has no block statistics: layer "
                                   "removal needs them ('aprender calibrate' records them)")
        keys.append((s.influence, i))
    return [i for _, i in sorted(keys)]


def expert_scores(expert_stats, prefixes):
    """REAP scores, one per expert prefix."""
    stats = _stats(expert_stats, "expert_stats")
    out = np.zeros(len(prefixes))
    for i, p in enumerate(prefixes):
        s = stats.get(p)
        if s is None:
            raise CalibrationError(f"expert {short_repr(p)} has no REAP statistics: expert "
                                   "removal needs them ('aprender calibrate' records them)")
        out[i] = s.reap
    return out


def kept_count(width, fraction, round_to):
    """``width - round(fraction * width)``, at least 1, rounded UP to a multiple of
    ``round_to`` (never removing more than asked), at most ``width``."""
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
    """{layer: sorted kept indices}: the same count in every layer, the highest scores (ties:
    the lower index kept)."""
    out = {}
    width = None
    for layer, s in scores_per_layer.items():
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if np.isnan(s).any():
            raise InvalidArgumentError(f"scores of layer {short_repr(layer)} hold NaN")
        if width is None:
            width = s.size
            k = kept_count(width, fraction, round_to)
        elif s.size != width:
            raise InvalidArgumentError(f"keep_uniform keeps the same width in every layer, but "
                                       f"layer {short_repr(layer)} has {s.size} scores, not "
                                       f"{width}")
        order = np.lexsort((np.arange(s.size), -s))  # highest first, then the lower index
        out[layer] = np.sort(order[:k]).astype(np.intp)
    return out
