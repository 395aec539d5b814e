"""Calibration from a local Hugging Face model folder: the calibration text, and module names
matched to the checkpoint's weight names.

``aprender calibrate MODEL_DIR --text FILE -o calib.safetensors`` runs the folder's model one
block at a time from its memory-mapped safetensors files (:mod:`aprender.models.executor`) and
saves one :class:`~aprender.pruning.ActivationStats` per Linear under the name its weight has
*in the checkpoint files*.  :func:`checkpoint_names` matches module names to checkpoint names by
suffix and shape for callers that hold a model whose names differ from its files' (``AutoModel``
on a causal-LM checkpoint drops the ``model.`` prefix, sentence-transformers wraps the encoder).

transformers and torch are optional: ``pip install "aprender[calibrate]"``.
"""
from .errors import CalibrationError
from .io.files import display, open_regular

__all__ = ["calibrate_folder", "checkpoint_names", "read_text_samples"]

MAX_LINE = 1 << 20


def read_text_samples(path, limit):
    """Up to ``limit`` non-empty lines of a UTF-8 text file (one calibration sample each).
    No read is longer than ``MAX_LINE`` + 1 bytes: a longer line is refused before the rest
    of it is read."""
    out = []
    with open_regular(path) as f:
        while True:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                break
            if len(raw.rstrip(b"\r\n")) > MAX_LINE:
                raise CalibrationError(f"{display(path)}: a line longer than {MAX_LINE} bytes")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise CalibrationError(f"{display(path)}: not UTF-8 text ({exc.reason})") \
                    from None
            if line:
                out.append(line)
                if len(out) >= limit:
                    break
    if not out:
        raise CalibrationError(f"{display(path)}: no calibration text (every line is empty)")
    return out


def checkpoint_names(module_shapes, weight_shapes):
    """{module name: checkpoint layer name (the weight's name less ".weight")} for the modules
    whose weight is found in the checkpoint; ``module_shapes``: {module name: weight shape},
    ``weight_shapes``: {checkpoint tensor name: shape}.  A module matches the weight named
    ``P + suffix + ".weight"`` where suffix is the module name or the module name less its
    leading components, with the same shape; ambiguous matches are errors.  A suffix keeps at
    least two components (or the whole name of a one-component module such as ``lm_head``):
    a module the checkpoint does not hold (``pooler.dense`` of a masked-LM checkpoint) is not
    matched to some other layer's ``dense`` by its last component."""
    by_suffix = {}
    for name, shape in weight_shapes.items():
        if not name.endswith(".weight"):
            continue
        parts = name[:-len(".weight")].split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append((name, tuple(shape)))
    out = {}
    for mod, shape in module_shapes.items():
        parts = mod.split(".")
        for i in range(max(1, len(parts) - 1)):
            hits = [n for n, s in by_suffix.get(".".join(parts[i:]), ()) if s == tuple(shape)]
            if len(hits) == 1:
                out[mod] = hits[0][:-len(".weight")]
                break
            if len(hits) > 1:
                raise CalibrationError(f"module {mod!r} matches several checkpoint weights "
                                       f"({', '.join(sorted(hits)[:4])}); cannot name its "
                                       "statistics")
    seen = {}
    for mod, layer in out.items():
        if layer in seen:
            raise CalibrationError(f"modules {seen[layer]!r} and {mod!r} both map to the "
                                   f"checkpoint weight {layer}.weight")
        seen[layer] = mod
    return out


def calibrate_folder(model_dir, samples, **options):
    """(CalibrationContext named by checkpoint weights, [Linear modules left out]) for the
    model in ``model_dir`` over the text ``samples``, run one block at a time from the
    memory-mapped checkpoint: see :func:`aprender.models.executor.calibrate_folder` for the
    options (max_length, batch_size, hessian, dtype, memory_budget, scratch_near, progress,
    n_threads)."""
    from .models.executor import calibrate_folder as run

    return run(model_dir, samples, **options)
