"""Importance: how much each weight matters.  Magnitude importance scores |w|^p in one kernel pass
that also returns statistics of the scores."""
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .._kernels import stats as _stats
from .._validation import (Bits16, as_floats, as_real, raise_nonfinite, resolve_threads,
                           short_repr)
from ..errors import InvalidArgumentError, InvalidCalibrationError, NumericalInstabilityError

__all__ = ["Importance", "MagnitudeImportance", "ImportanceScores", "ImportanceStats",
           "check_calibration"]


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
    module does not depend on it) or any object with the same interface: a ``layer_names``
    attribute and a callable ``get_stats``."""
    if calibration is None:
        return None
    from .. import pruning

    context_cls = getattr(pruning, "CalibrationContext", None)
    if isinstance(context_cls, type) and isinstance(calibration, context_cls):
        return calibration
    if hasattr(calibration, "layer_names") and callable(getattr(calibration, "get_stats", None)):
        return calibration
    kind = type(calibration)
    what = kind.__name__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"
    raise InvalidCalibrationError(f"calibration must be None or an aprender.pruning."
                                  f"CalibrationContext, got {what} {short_repr(calibration, 60)}")


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
