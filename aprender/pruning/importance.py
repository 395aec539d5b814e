"""Importance: how much each weight matters.  Magnitude importance scores |w|^p in one kernel pass
that also returns statistics of the scores; Wanda importance scores |w| times the norm of the
weight's input feature over calibration data."""
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .._kernels import calib as _calib
from .._kernels import stats as _stats
from .._validation import (Bits16, as_floats, as_real, raise_nonfinite, resolve_threads,
                           short_repr)
from ..errors import (CalibrationError, CalibrationRequiredError, InvalidArgumentError,
                      InvalidCalibrationError, InvalidDTypeError, InvalidShapeError,
                      MissingActivationStatsError, NumericalInstabilityError, ShapeMismatchError)

__all__ = ["Importance", "MagnitudeImportance", "WandaImportance", "ImportanceScores",
           "ImportanceStats", "check_calibration", "layer_stats", "wanda_scale", "wanda_scores"]


@dataclass(frozen=True)
class ImportanceStats:
    """Statistics of a score array, accumulated in float64 (std is the population std, ddof=0)."""

    min: float
    max: float
    mean: float
    std: float
    count: int


@dataclass(frozen=True)
class ImportanceScores:
    """Scores with the same shape as the weights (larger = more important)."""

    values: np.ndarray  # same dtype as the weights (an aprender.Bits16 for Bits16 weights)
    method: str
    stats: ImportanceStats

    @property
    def shape(self):
        return self.values.shape

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


@runtime_checkable
class Importance(Protocol):
    """What every importance method provides."""

    name: str
    requires_calibration: bool

    def compute(self, module_or_array, calibration=None) -> ImportanceScores: ...


def check_calibration(calibration):
    """Return ``calibration`` if it is None or calibration data, else raise
    InvalidCalibrationError naming the type received.

    Calibration data is an ``aprender.pruning.CalibrationContext`` (looked up lazily, so this
    module does not depend on it), any object with the same interface (a ``layer_names``
    attribute and a callable ``get_stats``), or one layer's ``ActivationStats``."""
    if calibration is None:
        return None
    from .. import pruning

    for cls_name in ("CalibrationContext", "ActivationStats"):
        cls = getattr(pruning, cls_name, None)
        if isinstance(cls, type) and isinstance(calibration, cls):
            return calibration
    if hasattr(calibration, "layer_names") and callable(getattr(calibration, "get_stats", None)):
        return calibration
    kind = type(calibration)
    what = kind.__name__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"
    raise InvalidCalibrationError(f"calibration must be None or an aprender.pruning."
                                  f"CalibrationContext, got {what} {short_repr(calibration, 60)}")


def layer_stats(layer_name, calibration, method, cls_name):
    """A layer's ActivationStats for an importance method: ``calibration`` is the
    ActivationStats themselves or a CalibrationContext in which ``layer_name`` is looked up.
    Raises CalibrationRequiredError without calibration and MissingActivationStatsError for a
    layer the context does not hold."""
    from .calibration import ActivationStats

    if calibration is None:
        raise CalibrationRequiredError(
            f"{method} importance needs calibration statistics: pass calibration= a "
            "CalibrationContext (aprender.torch.collect_calibration, or "
            "CalibrationContext.load) or the layer's ActivationStats")
    if isinstance(calibration, ActivationStats):
        return calibration
    ctx = check_calibration(calibration)
    if layer_name is None:
        raise InvalidArgumentError(f"{cls_name}() has no layer_name: pass the layer's "
                                   f"ActivationStats as calibration, or create "
                                   f"{cls_name}('<layer name>') to look it up")
    req = getattr(ctx, "require_stats", None)
    if callable(req):
        stats = req(layer_name)
    else:
        stats = ctx.get_stats(layer_name)
        if stats is None:
            raise MissingActivationStatsError(
                f"no activation statistics for layer {layer_name!r}", layer=layer_name)
    if not isinstance(stats, ActivationStats):
        raise InvalidCalibrationError(f"calibration statistics of layer {layer_name!r} are a "
                                      f"{type(stats).__name__}, not an ActivationStats")
    return stats


def _weights_of(module_or_array):
    w = getattr(module_or_array, "weight", None)
    if w is not None and not isinstance(module_or_array, np.ndarray):
        return w
    return module_or_array


class MagnitudeImportance:
    """Importance |w|^p.  ``l1()`` scores |w|, ``l2()`` scores w**2 (the order of |w| either way)."""

    requires_calibration = False

    def __init__(self, p=1):
        value = as_real(p, "MagnitudeImportance p (a finite p > 0)")
        if not math.isfinite(value) or value <= 0:
            raise InvalidArgumentError(f"MagnitudeImportance needs a finite p > 0, got {p!r}")
        self.p = value

    @classmethod
    def l1(cls):
        return cls(1)

    @classmethod
    def l2(cls):
        return cls(2)

    @property
    def name(self):
        p = int(self.p) if self.p.is_integer() else self.p
        return f"magnitude_l{p}"

    def __repr__(self):
        return f"MagnitudeImportance(p={self.p:g})"

    def compute(self, module_or_array, calibration=None, *, n_threads=None) -> ImportanceScores:
        """Scores of a module's ``weight`` (or of an array), in the weights' dtype, with stats.
        ``calibration`` (None or an ``aprender.pruning.CalibrationContext``) is accepted for
        protocol compatibility and ignored by magnitude; anything else raises
        InvalidCalibrationError."""
        check_calibration(calibration)
        f = as_floats(_weights_of(module_or_array), "weights")
        nt = resolve_threads(n_threads)
        out = np.empty_like(f.array)
        kout = out.view(np.uint16) if f.fmt else out
        pk = 1 if self.p == 1 else 2 if self.p == 2 else 0
        mn, mx, mean, std, bad = _stats.scores_stats(f.kernel.reshape(-1), pk, self.p, f.fmt,
                                                     kout.reshape(-1), nt)
        if bad:
            raise_nonfinite(f, "weights")
        if f.size and not math.isfinite(mx):
            flat = kout.reshape(-1)
            i = int(np.argmax((flat & f.inf16) == f.inf16)) if f.fmt else \
                int(np.argmax(~np.isfinite(flat)))
            idx = tuple(int(v) for v in np.unravel_index(i, f.shape))
            raise NumericalInstabilityError(
                f"{self.name} score of the weight at index {idx} overflows {f.dtype_name} "
                "(the scores keep the weights' dtype); use MagnitudeImportance.l1(), or weights "
                "of a wider dtype", index=idx, value="inf")
        if isinstance(module_or_array, Bits16) or isinstance(_weights_of(module_or_array), Bits16):
            out = Bits16(out, f.dtype_name)
        return ImportanceScores(out, self.name, ImportanceStats(mn, mx, mean, std, int(f.size)))


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------

def _stats_where(stats, layer):
    """"layer 'x' of calibration file 'f': " for messages about a layer's statistics: the file
    when they were read from one, the layer as the caller or the file names it."""
    origin = getattr(stats, "_origin", None)
    if origin is not None:
        return f"{origin}: "
    if layer is not None:
        return f"layer {short_repr(layer)}: "
    return ""


def wanda_scale(stats, dtype=np.float32, *, layer=None):
    """The per-column Wanda scale of a layer: ``‖X_j‖₂ = sqrt(stats.sum_squares[j])``, computed
    in float64 and rounded once to ``dtype`` (float32, the default, or float64).

    The Wanda score of weight ``w[i, j]`` is then exactly ``float32(|w[i, j]|) * scale[j]`` (one
    float32 multiply) for float16, bfloat16 and float32 weights, and ``|w| * scale`` in float64
    for float64 weights (``dtype=np.float64``): :func:`wanda_scores`, WandaImportance and the
    command line all compute it this way, so they agree bit for bit.

    ``stats``: an ActivationStats with at least one token (CalibrationError otherwise).  A norm
    beyond the float32 range raises NumericalInstabilityError.  Messages name the layer
    (``layer``, or the file's name for statistics read with ``CalibrationContext.load``) and
    the calibration file they came from."""
    from .calibration import ActivationStats

    if not isinstance(stats, ActivationStats):
        raise InvalidCalibrationError(f"wanda_scale needs an aprender.pruning.ActivationStats, "
                                      f"got {type(stats).__name__}")
    dt = np.dtype(dtype) if dtype in (np.float32, np.float64, "float32", "float64") else None
    if dt is None:
        raise InvalidDTypeError(f"wanda_scale dtype must be float32 or float64, got "
                                f"{short_repr(dtype)}")
    at = _stats_where(stats, layer)
    if stats.count == 0:
        raise CalibrationError(f"{at}the calibration statistics hold no tokens (count is 0): "
                               "every Wanda score would be 0")
    norms = np.sqrt(stats.sum_squares)
    with np.errstate(over="ignore"):
        scale = norms.astype(dt)
    if not np.isfinite(scale).all():
        j = int(np.argmax(~np.isfinite(scale)))
        raise NumericalInstabilityError(
            f"{at}the input norm of feature {j} ({float(norms[j]):.6g}) overflows {dt.name}",
            index=(j,), value="inf")
    return scale


def wanda_scores(weights, scale, *, out=None, n_threads=None):
    """Wanda scores ``|w[..., j]| * scale[j]`` of a weight array (or any slice of rows of one)
    and a scale from :func:`wanda_scale`: float32 scores for float16, bfloat16 and float32
    weights with a float32 scale, float64 scores for float64 weights with a float64 scale.

    ``weights`` has the input dimension last (``(out_features, in_features)`` for a Linear);
    ``out`` (optional) receives the scores (C-contiguous, the weights' shape).  Non-finite
    weights or scores that overflow raise NumericalInstabilityError naming the element."""
    f = as_floats(weights, "weights")
    return _wanda_values(f, scale, out, resolve_threads(n_threads))[0]


def _wanda_values(f, scale, out, nt, stats=False):
    """(scores, (min, max, mean, std) or None) for a Floats f and a scale."""
    if f.array.ndim == 0:
        raise InvalidShapeError("weights: expected an array with at least 1 dimension")
    wide = f.dtype_name == "float64"
    sdt = np.dtype(np.float64 if wide else np.float32)
    sc = np.asarray(scale)
    if sc.dtype != sdt or sc.ndim != 1:
        raise InvalidDTypeError(f"{f.dtype_name} weights need a 1-D {sdt.name} scale "
                                f"(wanda_scale(stats, np.{sdt.name})), got {sc.dtype} of shape "
                                f"{sc.shape}")
    cols = f.shape[-1]
    if sc.shape[0] != cols:
        raise ShapeMismatchError(f"weights of shape {f.shape} have {cols} input features but "
                                 f"the scale has {sc.shape[0]}")
    sc = np.ascontiguousarray(sc)
    bad_scale = ~(sc >= 0) | ~np.isfinite(sc)  # NaN fails the first test
    if bad_scale.any():
        j = int(np.argmax(bad_scale))
        raise NumericalInstabilityError(
            f"the scale of input feature {j} is {float(sc[j])!r}; Wanda scales are input norms, "
            "finite and >= 0 (from wanda_scale)", index=(j,), value=repr(float(sc[j])))
    if out is None:
        out = np.empty(f.shape, dtype=sdt)
    elif not (isinstance(out, np.ndarray) and out.dtype == sdt and out.shape == f.shape
              and out.flags.c_contiguous and out.flags.writeable):
        raise InvalidArgumentError(f"out must be a writeable C-contiguous {sdt.name} array of "
                                   f"shape {f.shape}")
    rows = f.size // cols if cols else 0
    k = f.kernel.reshape(rows, cols)
    o = out.reshape(rows, cols)
    bad = np.zeros(rows, dtype=np.uint8)
    if wide:
        res = _calib.wanda_scores64(k, sc, o, bad, stats, nt)
    else:
        res = _calib.wanda_scores32(k, f.fmt, sc, o, bad, stats, nt)
    if bad.any():
        if f.fmt:
            weights_bad = bool(((f.kernel & f.inf16) == f.inf16).any())
        else:
            weights_bad = not bool(np.isfinite(f.kernel).all())
        if weights_bad:
            raise_nonfinite(f, "weights")
        i = int(np.argmax(~np.isfinite(o.reshape(-1))))
        idx = tuple(int(v) for v in np.unravel_index(i, f.shape))
        raise NumericalInstabilityError(
            f"the Wanda score of the weight at index {idx} overflows {sdt.name}",
            index=idx, value="inf")
    return out, res


class WandaImportance:
    """Wanda importance (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large
    Language Models"): ``|W[i, j]| * ‖X_j‖₂``, the weight's magnitude times the L2 norm of its
    input feature over the calibration tokens.

    ``WandaImportance(layer_name)`` looks the layer's statistics up in the CalibrationContext
    passed to :meth:`compute`; ``WandaImportance()`` (no name) takes the layer's
    ActivationStats directly.  Precision: float32 scores for float16, bfloat16 and float32
    weights (``float32(|w|) * float32(‖X_j‖)``, as the reference implementation computes with
    torch), float64 scores for float64 weights; see :func:`wanda_scale`.  Wanda prunes per
    output row (``generate_unstructured_mask(scores, s, per_row=True)``) or N:M along the input
    dimension (``generate_nm_mask(scores, 2, 4)``)."""

    name = "wanda"
    requires_calibration = True

    def __init__(self, layer_name=None):
        if layer_name is not None and not isinstance(layer_name, str):
            raise InvalidArgumentError(f"WandaImportance layer_name must be a string or None, "
                                       f"got {type(layer_name).__name__} "
                                       f"{short_repr(layer_name)}")
        self.layer_name = layer_name

    def __repr__(self):
        return f"WandaImportance({self.layer_name!r})" if self.layer_name is not None else \
            "WandaImportance()"

    def stats_from(self, calibration):
        """The layer's ActivationStats from ``calibration`` (a CalibrationContext or the
        ActivationStats themselves)."""
        return layer_stats(self.layer_name, calibration, "Wanda", "WandaImportance")

    def compute(self, layer_or_weights, calibration=None, *, n_threads=None) -> ImportanceScores:
        """Scores of a module's ``weight`` (or of a weight array whose last axis is the input
        dimension), with their statistics.  Raises CalibrationRequiredError without
        calibration, MissingActivationStatsError for a layer absent from the context, and
        ShapeMismatchError naming both shapes when the weight's input dimension differs from
        the statistics'."""
        stats = self.stats_from(calibration)
        f = as_floats(_weights_of(layer_or_weights), "weights")
        if f.shape[-1] != stats.in_features:
            layer = f" of layer {self.layer_name!r}" if self.layer_name is not None else ""
            raise ShapeMismatchError(
                f"weights of shape {f.shape} do not match the calibration statistics{layer}, "
                f"shape ({stats.in_features},): the weights' last axis must be the "
                f"{stats.in_features} input features")
        wide = f.dtype_name == "float64"
        scale = wanda_scale(stats, np.float64 if wide else np.float32, layer=self.layer_name)
        nt = resolve_threads(n_threads)
        values, res = _wanda_values(f, scale, None, nt, stats=True)
        # statistics from the same pass (float64, per row in a fixed order, rows merged in order)
        mn, mx, mean, std = res if res is not None else (float("nan"),) * 4
        return ImportanceScores(values, self.name,
                                ImportanceStats(mn, mx, mean, std, int(values.size)))
