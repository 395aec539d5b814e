"""The object API: importance, calibration, masks, patterns and errors."""
from ..errors import (CalibrationError, CalibrationFileError, CalibrationRequiredError,
                      CheckpointError, DeviceError, InvalidArgumentError,
                      HessianError, InsufficientMemoryError, InvalidCalibrationError,
                      InvalidDTypeError, InvalidPatternError,
                      InvalidShapeError, InvalidSparsityError, LayoutError,
                      MissingActivationStatsError, NumericalInstabilityError, PruningError,
                      ReadOnlyError, ShapeMismatchError)
from .calibration import ActivationStats, BlockStats, CalibrationContext, ExpertStats
from .importance import (Importance, ImportanceScores, ImportanceStats, MagnitudeImportance,
                         WandaImportance, wanda_scale, wanda_scores)
from .reconstruct import SparseGPTImportance, sparsegpt
from .owl import OwlAllocation, owl_allocation, owl_outlier_ratio, owl_sparsities
from .mask import (SparsityMask, SparsityPattern, generate_block_mask, generate_column_mask,
                   generate_global_mask, generate_nm_mask, generate_row_mask,
                   generate_unstructured_mask, magnitude_mask, magnitude_nm_mask)

__all__ = [
    "Importance", "ImportanceScores", "ImportanceStats", "MagnitudeImportance",
    "WandaImportance", "wanda_scale", "wanda_scores", "SparseGPTImportance", "sparsegpt",
    "ActivationStats", "CalibrationContext", "BlockStats", "ExpertStats",
    "owl_outlier_ratio", "owl_allocation", "owl_sparsities", "OwlAllocation",
    "SparsityMask", "SparsityPattern",
    "generate_unstructured_mask", "generate_nm_mask", "generate_global_mask",
    "generate_block_mask", "generate_row_mask", "generate_column_mask",
    "magnitude_mask", "magnitude_nm_mask",
    "PruningError", "InvalidSparsityError", "InvalidPatternError", "ShapeMismatchError",
    "InvalidShapeError", "InvalidDTypeError", "NumericalInstabilityError", "InvalidArgumentError",
    "ReadOnlyError", "LayoutError", "CheckpointError", "DeviceError", "CalibrationError",
    "InvalidCalibrationError", "CalibrationRequiredError", "MissingActivationStatsError",
    "CalibrationFileError", "HessianError", "InsufficientMemoryError",
]
