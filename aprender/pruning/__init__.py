"""The object API: importance, masks, patterns and errors."""
from ..errors import (CalibrationError, CheckpointError, DeviceError, InvalidArgumentError,
                      InvalidCalibrationError, InvalidDTypeError, InvalidPatternError,
                      InvalidShapeError, InvalidSparsityError, LayoutError,
                      NumericalInstabilityError, PruningError, ReadOnlyError, ShapeMismatchError)
from .importance import Importance, ImportanceScores, ImportanceStats, MagnitudeImportance
from .mask import (SparsityMask, SparsityPattern, generate_block_mask, generate_column_mask,
                   generate_global_mask, generate_nm_mask, generate_row_mask,
                   generate_unstructured_mask, magnitude_mask, magnitude_nm_mask)

__all__ = [
    "Importance", "ImportanceScores", "ImportanceStats", "MagnitudeImportance",
    "SparsityMask", "SparsityPattern",
    "generate_unstructured_mask", "generate_nm_mask", "generate_global_mask",
    "generate_block_mask", "generate_row_mask", "generate_column_mask",
    "magnitude_mask", "magnitude_nm_mask",
    "PruningError", "InvalidSparsityError", "InvalidPatternError", "ShapeMismatchError",
    "InvalidShapeError", "InvalidDTypeError", "NumericalInstabilityError", "InvalidArgumentError",
    "ReadOnlyError", "LayoutError", "CheckpointError", "DeviceError", "CalibrationError",
    "InvalidCalibrationError",
]
