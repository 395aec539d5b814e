"""aprender: magnitude and calibration-aware (Wanda, OWL) pruning with exact, fast Cython+OpenMP
kernels."""
import importlib.util
import os
import sys

__version__ = "0.1.0"

from . import _threads  # noqa: E402,F401 - first: OpenMP's wait policy, before any kernel
from . import pruning  # noqa: E402,F401  
from ._validation import Bits16  # noqa: E402
from .pruning import (SparsityMask, SparsityPattern, MagnitudeImportance,  # noqa: E402,F401
                      generate_unstructured_mask, generate_nm_mask, generate_global_mask,
                      magnitude_mask, magnitude_nm_mask, PruningError, WandaImportance,
                      ActivationStats, CalibrationContext, owl_sparsities)

__all__ = ["__version__", "show_config", "Bits16", "pruning", "SparsityMask", "SparsityPattern",
           "MagnitudeImportance", "generate_unstructured_mask", "generate_nm_mask",
           "generate_global_mask", "magnitude_mask", "magnitude_nm_mask", "PruningError",
           "WandaImportance", "ActivationStats", "CalibrationContext", "owl_sparsities"]


def show_config(print_out=True):
    """Print and return the build and runtime configuration (CuPy is looked up, not imported)."""
    import numpy

    from ._kernels import _openmp
    from ._threads import blas_bounded, effective_n_threads

    cupy_loaded = "cupy" in sys.modules
    cfg = {
        "version": __version__,
        "openmp": _openmp.openmp_enabled(),
        "threads": effective_n_threads(),  # OpenMP's limit, CPU affinity, cgroup quota
        "openmp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default"),
        # BLAS/LAPACK pools bounded by the same count (threadpoolctl), or left as they are
        "blas_threads": "bounded by threads" if blas_bounded()
        else "not bounded (install threadpoolctl)",
        "cupy_available": cupy_loaded or importlib.util.find_spec("cupy") is not None,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
    }
    if print_out:
        width = max(len(k) for k in cfg)
        for k, v in cfg.items():
            print(f"{k:<{width}} : {v}")
    return cfg
