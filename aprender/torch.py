"""PyTorch interop: zero-copy numpy views of CPU tensors and in-place pruning of modules.

torch is optional and imported only when these functions run (never at ``import aprender``).

CUDA (or any non-CPU) tensors are refused with :class:`DeviceError` rather than copied silently:
pruning in place through a host copy would not change the device tensor.  Move the module or
tensor to the CPU (``.cpu()``), prune, and move it back.
"""
import re

import numpy as np

from ._validation import Bits16, check_sparsity, prune_count, resolve_threads
from .errors import (DeviceError, InvalidArgumentError, InvalidDTypeError,  # noqa: F401
                     InvalidPatternError, PruningError)

__all__ = ["DeviceError", "to_numpy_view", "prune_"]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("aprender.torch needs PyTorch (pip install torch)") from exc
    return torch


def to_numpy_view(tensor):
    """A zero-copy numpy view of a CPU tensor (writes go to the tensor's memory).

    bfloat16 tensors become ``Bits16(uint16 bit patterns, "bfloat16")``.  Gradients are ignored
    (the view is of the detached data).  Non-CPU tensors raise DeviceError; sparse or quantized
    tensors raise InvalidDTypeError."""
    torch = _torch()
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
    return t.numpy()


def _parse_pattern(pattern):
    if not isinstance(pattern, str):
        raise InvalidPatternError(f"pattern must be a string, got {pattern!r}")
    t = pattern.strip().lower()
    if t in ("unstructured", "row"):
        return t, None, None
    mt = re.fullmatch(r"(\d+):(\d+)", t)
    if not mt or not 1 <= int(mt.group(1)) <= int(mt.group(2)):
        raise InvalidPatternError(f"invalid pattern {pattern!r}: use 'unstructured', 'row' or "
                                  "N:M such as '2:4' (1 <= N <= M)")
    return "nm", int(mt.group(1)), int(mt.group(2))


def _targets(module, include):
    torch = _torch()
    if include is not None:
        pats = [include] if isinstance(include, str) else list(include)
        try:
            regs = [re.compile(p) for p in pats]
        except (re.error, TypeError) as exc:
            raise InvalidArgumentError(f"include: invalid regular expression ({exc})") from None
    out = []
    for mod_name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        linear = isinstance(mod, torch.nn.Linear)
        if include is None:
            hit = linear
        else:
            hit = any(r.search(name) for r in regs) and (linear or w.dim() == 2)
        if hit and w.is_floating_point():
            out.append((name, mod, w))
    return out


def _global_keeps(views, sparsity, nt):
    """Exact global magnitude selection over views (Bits16 or float arrays), no concatenation."""
    from ._validation import as_floats
    from .pruning.mask import _common_dtype, _raise_first_nonfinite, _threshold_mask

    # mixed dtypes are compared exactly in float32 (float64 if any tensor is float64)
    floats = _common_dtype([as_floats(v, "weight") for v in views])

    total = sum(f.size for f in floats)
    k = prune_count(sparsity, total)
    keeps = [np.empty(f.size, np.uint8) for f in floats]
    if _threshold_mask(floats, keeps, k, 1, nt):
        _raise_first_nonfinite(floats, ["weight"] * len(floats))
    return keeps


def prune_(module, sparsity=None, pattern="unstructured", scope="layer", include=None,
           importance="l1", keep_mask=False, n_threads=None):
    """Prune a module's weights in place by magnitude; returns a per-layer report.

    Targets: every ``nn.Linear`` weight, or with ``include`` (a regex or list of regexes searched
    in the parameter name, e.g. ``"layers\\.0\\."``) the Linear weights and other 2-D weights
    whose name matches.  ``pattern``: "unstructured", "row" (same fraction in every row) or
    "N:M" such as "2:4" (``sparsity`` then implied).  ``scope``: "layer" (each weight pruned to
    ``sparsity``) or "global" (one exact count over all targets, unstructured only).
    ``importance``: "l1" or "l2" (the same ranking for magnitude pruning).

    ``keep_mask=False`` zeros the weights through a zero-copy view.  ``keep_mask=True`` leaves
    the data alone and registers the mask with ``torch.nn.utils.prune.custom_from_mask`` (the
    module gets ``weight_orig`` and ``weight_mask``, as torch's own pruning does).

    Ties are broken by index (lowest flat index pruned first), so on tie-free data the masks equal
    ``torch.nn.utils.prune.l1_unstructured`` (layer) and ``global_unstructured`` (global).
    Each report entry: name, shape, dtype, total, kept, sparsity."""
    torch = _torch()
    from .pruning.mask import layer_magnitude_mask

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(f"prune_ needs a torch.nn.Module, got {type(module).__name__}")
    kind, n, m = _parse_pattern(pattern)
    if importance not in ("l1", "l2"):
        raise InvalidArgumentError(f"importance must be 'l1' or 'l2', got {importance!r}")
    if scope not in ("layer", "global"):
        raise InvalidArgumentError(f"scope must be 'layer' or 'global', got {scope!r}")
    if kind == "nm":
        if sparsity is not None and abs(check_sparsity(sparsity) - (1 - n / m)) > 1e-9:
            raise InvalidArgumentError(f"sparsity={sparsity} contradicts pattern {pattern!r}")
        if scope == "global":
            raise InvalidArgumentError("scope='global' needs pattern='unstructured'")
    else:
        if sparsity is None:
            raise InvalidArgumentError(f"pattern {kind!r} needs a sparsity")
        sparsity = check_sparsity(sparsity)
        if scope == "global" and kind != "unstructured":
            raise InvalidArgumentError("scope='global' needs pattern='unstructured'")
    nt = resolve_threads(n_threads)
    targets = _targets(module, include)
    if not targets:
        raise InvalidArgumentError("prune_: no weight matches (nn.Linear weights, or include="
                                   f"{include!r})")
    views = [to_numpy_view(w) for _, _, w in targets]
    if scope == "global":
        keeps = [kp.reshape(v.shape).view(np.bool_)
                 for kp, v in zip(_global_keeps(views, sparsity, nt), views)]
    else:
        keeps = []
        for (name, _, _), v in zip(targets, views):
            try:
                mk = layer_magnitude_mask(v, kind, sparsity, n, m, n_threads=nt)
            except PruningError as exc:
                raise type(exc)(f"{name}: {exc}") from None
            keeps.append(mk.keep)
    from ._kernels import apply as _apply
    from .pruning import SparsityMask

    report = []
    for (name, mod, w), v, keep in zip(targets, views, keeps):
        if keep_mask:
            import torch.nn.utils.prune as tprune

            tprune.custom_from_mask(mod, "weight", torch.from_numpy(np.array(keep)).to(w.dtype))
        else:
            SparsityMask(keep, _trusted=True).apply(w, n_threads=nt)
        total = keep.size
        kept = int(_apply.count_nonzero_u8(np.ascontiguousarray(keep).reshape(-1).view(np.uint8),
                                           nt)) if total else 0
        report.append({"name": name, "shape": list(w.shape), "dtype": str(w.dtype).replace(
            "torch.", ""), "total": total, "kept": kept,
            "sparsity": (total - kept) / total if total else 0.0})
    return report
