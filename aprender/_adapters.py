"""Adapters at the bottom of the library: raw 16-bit float bits, and zero-copy numpy views of
arrays from other libraries (PyTorch CPU tensors; CuPy arrays are recognised, never imported).

Everything above (validation, kernels' wrappers, the object API, the torch front end) comes
here to ask "is this a torch tensor / a CuPy array?" and for the numpy view of one.
"""
import sys

import numpy as np

from .errors import DeviceError, InvalidArgumentError, InvalidDTypeError

__all__ = ["Bits16", "is_torch", "is_cupy", "to_numpy_view"]


class Bits16:
    """A uint16 array holding raw 16-bit float bit patterns, tagged with its format.

    ``Bits16(raw, "bfloat16")`` or ``Bits16(raw, "float16")`` lets callers without ml_dtypes pass
    bfloat16 weights (say, a safetensors buffer) to every aprender entry point without a copy.
    """

    __slots__ = ("bits", "format")

    def __init__(self, bits, format="bfloat16"):
        bits = np.asarray(bits)
        if bits.dtype != np.uint16:
            raise InvalidDTypeError(f"Bits16 needs a uint16 array of bit patterns, got {bits.dtype}")
        if format not in ("bfloat16", "float16"):
            raise InvalidArgumentError(f"Bits16 format must be 'bfloat16' or 'float16', got {format!r}")
        self.bits = bits
        self.format = format

    @property
    def shape(self):
        return self.bits.shape

    @property
    def size(self):
        return self.bits.size

    @property
    def ndim(self):
        return self.bits.ndim

    def __repr__(self):
        return f"Bits16(shape={self.bits.shape}, format={self.format!r})"


def is_torch(x):
    """True for a torch.Tensor (or subclass), decided without importing torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy(x):
    """True for a CuPy array, decided without importing CuPy."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def to_numpy_view(tensor):
    """A zero-copy numpy view of a CPU tensor (writes go to the tensor's memory).

    bfloat16 tensors become ``Bits16(uint16 bit patterns, "bfloat16")``.  Gradients are ignored
    (the view is of the detached data).  Non-CPU tensors raise DeviceError; sparse or quantized
    tensors raise InvalidDTypeError."""
    import torch  # only reached with a torch object in hand
    if not isinstance(tensor, torch.Tensor):
        raise InvalidDTypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise DeviceError(f"tensor is on device '{tensor.device}'; aprender works on CPU memory: "
                          "move it with .cpu() first (and back with .to(device) afterwards)")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise InvalidDTypeError(f"expected a dense (strided) tensor, got layout {tensor.layout}"
                                + (" (quantized)" if tensor.is_quantized else ""))
    t = tensor.detach()
    if t.is_conj() or t.is_neg():
        raise InvalidDTypeError("tensor has a lazy conjugate/negative bit; call .resolve_conj() "
                                "and .resolve_neg() first")
    if t.dtype == torch.bfloat16:
        return Bits16(t.view(torch.int16).numpy().view(np.uint16), "bfloat16")
    try:
        return t.numpy()
    except TypeError:  # float8, complex32, ...: no numpy dtype to view them as
        raise InvalidDTypeError(f"tensor dtype {_dtype_name(t.dtype)} has no numpy equivalent; "
                                "aprender reads float16, bfloat16, float32 and float64 tensors "
                                "(cast with .to(...) first)") from None
