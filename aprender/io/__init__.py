"""Checkpoint I/O: a small streaming safetensors reader and writer (numpy only), and the
compressed formats read back as dense arrays (:func:`load_dense`)."""
from .formats import load_dense
from .safetensors import (CheckpointError, SafetensorsFile, TensorInfo, read_header,
                          write_safetensors)

__all__ = ["load_dense", "CheckpointError", "SafetensorsFile", "TensorInfo", "read_header", "write_safetensors"]
