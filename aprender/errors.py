"""Typed errors.  Every error aprender raises on bad input derives from PruningError and from the
built-in exception a caller would naturally catch (ValueError or TypeError)."""

__all__ = [
    "PruningError",
    "InvalidSparsityError",
    "InvalidPatternError",
    "ShapeMismatchError",
    "InvalidShapeError",
    "InvalidDTypeError",
    "NumericalInstabilityError",
    "InvalidArgumentError",
    "ReadOnlyError",
    "LayoutError",
    "CheckpointError",
    "UnsafePathError",
    "CompressedFormatError",
    "DeviceError",
    "CalibrationError",
    "InvalidCalibrationError",
    "CalibrationRequiredError",
    "MissingActivationStatsError",
    "CalibrationFileError",
    "HessianError",
    "InsufficientMemoryError",
    "MissingExtraError",
    "ClusterError",
]


class PruningError(Exception):
    """Base class of every aprender error."""


class InvalidSparsityError(PruningError, ValueError):
    """A sparsity fraction that is not a real number in [0, 1]."""


class InvalidPatternError(PruningError, ValueError):
    """A pattern that is malformed (N > M, M <= 0, ...) or that a mask or shape does not satisfy."""


class ShapeMismatchError(PruningError, ValueError):
    """Two arrays that must share a shape do not."""


class InvalidShapeError(PruningError, ValueError):
    """An array whose shape the operation cannot take (0-d, axis out of range, blocks not tiling)."""


class InvalidDTypeError(PruningError, TypeError):
    """An array whose dtype the operation does not take (complex, object, integer scores, ...)."""


class NumericalInstabilityError(PruningError, ValueError):
    """NaN or infinity where finite numbers are required; the message names the first bad index."""

    def __init__(self, message, index=None, value=None):
        super().__init__(message)
        self.index = index
        self.value = value


class InvalidArgumentError(PruningError, ValueError):
    """Any other argument outside its domain (thread count, p of an Lp norm, ...)."""


class ReadOnlyError(PruningError, ValueError):
    """An in-place operation was given a read-only array."""


class LayoutError(PruningError, ValueError):
    """A weight that does not fit a compressed layout (more than two non-zeros in a 2:4 group, ...)."""


class CheckpointError(PruningError, ValueError):
    """A checkpoint, index, calibration file or path that cannot be used safely: missing,
    truncated, malformed (stricter than the safetensors format requires), a special file, a
    symlink that leaves the checkpoint, or an output that would overwrite an input."""


class UnsafePathError(CheckpointError):
    """An output or report path that would overwrite, contain or sit inside an input, or a
    special file (device, FIFO, socket) where a file would be written."""


class CompressedFormatError(CheckpointError):
    """A compressed tensor group in a checkpoint (compressed-tensors ``sparse-24-bitmask``
    ``P.shape``/``P.compressed``/``P.bitmask``, or aprender's ``bitmask`` ``W.values``/``W.mask``/
    ``W.shape``) whose parts do not fit together: wrong dtype or shape, a mask whose set bits do
    not match the stored values, non-zero padding bits."""


class DeviceError(PruningError, ValueError):
    """An array or tensor on a device aprender cannot read in place (CUDA tensors for CPU kernels)."""


class CalibrationError(PruningError, ValueError):
    """Calibration statistics that are missing, of the wrong shape, or inconsistent."""


class InvalidCalibrationError(PruningError, TypeError):
    """A ``calibration`` argument that is not calibration data (a string, an array, a dict...):
    importance methods take None or an ``aprender.pruning.CalibrationContext``."""


class CalibrationRequiredError(PruningError, ValueError):
    """An importance method that needs calibration statistics (Wanda) was called without them;
    collect them with ``aprender.torch.collect_calibration`` or load a calibration file."""


class MissingActivationStatsError(CalibrationError, KeyError):
    """A CalibrationContext holds no statistics for the layer asked for (``layer`` names it).
    A KeyError too, so ``context[name]`` behaves like a mapping lookup."""

    def __init__(self, message, layer=None):
        super().__init__(message)
        self.layer = layer

    def __str__(self):  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""


class CalibrationFileError(CheckpointError, CalibrationError):
    """A calibration file that is malformed (names, dtypes, shapes, metadata) or holds invalid
    statistics (negative counts, non-finite or negative sums, a Hessian of the wrong size)."""


class HessianError(CalibrationError):
    """A layer's input Hessian (XᵀX, for SparseGPT) that cannot be used: not square, not
    symmetric, holding NaN or infinity or a negative diagonal entry, all zero, or not positive
    definite after damping.  ``layer`` names the layer when it is known."""

    def __init__(self, message, layer=None):
        super().__init__(message)
        self.layer = layer


class InsufficientMemoryError(PruningError, MemoryError):
    """An allocation that cannot succeed or did not: statistics, a Hessian or a workspace
    larger than this machine's memory (refused before allocating when the size is known), or
    an allocation the system refused.  The message names what needed it (the file and the
    layer when it comes from a calibration file) and how many bytes."""


class MissingExtraError(PruningError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install "aprender[dask]"``)."""


class ClusterError(PruningError, RuntimeError):
    """A distributed run failed for a reason of the cluster's (a task's workers died more often
    than the scheduler allows, the scheduler went away); nothing was written."""
