"""Just enough of a module system to prune: Linear and Sequential on numpy arrays."""
import math

import numpy as np

from ._validation import as_array, check_bool, check_int, short_repr
from .errors import InvalidArgumentError, InvalidDTypeError, ShapeMismatchError

__all__ = ["Linear", "Sequential"]


class Linear:
    """y = x @ W.T + b, initialised like torch.nn.Linear: weight and bias uniform in
    [-1/sqrt(in_features), 1/sqrt(in_features)].  ``weight`` has shape (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True, seed=None, dtype=np.float32):
        self.in_features = check_int(in_features, "in_features", minimum=1)
        self.out_features = check_int(out_features, "out_features", minimum=1)
        if self.in_features * self.out_features > np.iinfo(np.intp).max // 8:
            raise InvalidArgumentError(
                f"Linear({self.in_features}, {self.out_features}) has more weights than an array "
                "can hold")
        bias = check_bool(bias, "bias")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise InvalidDTypeError(f"Linear needs a floating dtype, got {short_repr(dtype)}") \
                from None
        if dtype.kind != "f" and dtype.name != "bfloat16":
            raise InvalidDTypeError(f"Linear needs a floating dtype, got {dtype}")
        try:
            rng = np.random.default_rng(seed)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"Linear seed must be None, a non-negative integer or a "
                                       f"numpy Generator, got {short_repr(seed)} "
                                       f"({short_repr(str(exc), 120)})") from None
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(dtype)
        self.bias = rng.uniform(-bound, bound, self.out_features).astype(dtype) if bias else None

    def __call__(self, x):
        x = as_array(x, "Linear input")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"Linear expects inputs with last dimension {self.in_features}, "
                                     f"got shape {x.shape}")
        if x.dtype.kind not in "biuf" and x.dtype.name != "bfloat16":
            raise InvalidDTypeError(f"Linear needs real numbers as input, got dtype {x.dtype}")
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.weight.dtype})")


class Sequential:
    """Layers applied in order; ``named_linears()`` yields ('0', layer), ('1', layer), ..."""

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not callable(layer):
                raise InvalidArgumentError(f"Sequential layer {i} must be callable, got "
                                           f"{type(layer).__name__} {short_repr(layer)}")
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def named_linears(self):
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                yield str(i), layer
