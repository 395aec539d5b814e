"""Checkpoint I/O: a small streaming safetensors reader and writer (numpy only)."""
from .safetensors import (CheckpointError, SafetensorsFile, TensorInfo, read_header,
                          write_safetensors)

__all__ = ["CheckpointError", "SafetensorsFile", "TensorInfo", "read_header", "write_safetensors"]
