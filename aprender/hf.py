"""Calibration statistics from a local Hugging Face model folder, named as its checkpoint.

``aprender calibrate MODEL_DIR --text FILE -o calib.safetensors`` loads the folder with
transformers (offline, ``local_files_only``), runs the calibration text through it on the CPU
and saves one :class:`~aprender.pruning.ActivationStats` per ``nn.Linear`` under the name its
weight has *in the checkpoint files* — which is not always the module's name: ``AutoModel`` on
a causal-LM checkpoint drops the ``model.`` prefix (module ``layers.0.self_attn.q_proj``, file
``model.layers.0.self_attn.q_proj.weight``), a task head adds one, and sentence-transformers
wraps the encoder.  Each module is matched to the one checkpoint weight whose name ends with
the module's name (or with the module's name less its leading components) and whose shape is
the module weight's shape; a Linear with no such weight (a tied head) is left out and listed.

transformers and torch are optional: ``pip install "aprender[calibrate]"``.
"""
import os

from .errors import CalibrationError, InvalidArgumentError
from .io.checkpoint import Checkpoint
from .io.files import display, open_regular

__all__ = ["calibrate_folder", "checkpoint_names", "read_text_samples"]

MAX_LINE = 1 << 20


def _transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        raise ImportError("aprender calibrate needs PyTorch and transformers: "
                          "pip install \"aprender[calibrate]\"") from exc
    return transformers


def read_text_samples(path, limit):
    """Up to ``limit`` non-empty lines of a UTF-8 text file (one calibration sample each)."""
    out = []
    with open_regular(path) as f:
        for raw in f:
            if len(raw) > MAX_LINE:
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
    leading components, with the same shape; ambiguous matches are errors."""
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
        for i in range(len(parts)):
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


def calibrate_folder(model_dir, samples, *, max_length=512, batch_size=8, hessian=False,
                     progress=False, n_threads=None):
    """(CalibrationContext named by checkpoint weights, [Linear modules left out]) for the
    model in ``model_dir`` over the text ``samples``."""
    transformers = _transformers()
    import torch
    from .pruning.calibration import CalibrationContext
    from .torch import collect_calibration

    if max_length < 1 or batch_size < 1:
        raise InvalidArgumentError("max_length and batch_size must be >= 1")
    ckpt = Checkpoint(model_dir)  # the hardened reader: names and shapes of the files
    weight_shapes = {t.name: t.shape for _, t in ckpt.items()}
    folder = os.fspath(model_dir)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True,
                                                       dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"{display(folder)}: transformers cannot load this folder "
                               f"offline ({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    modules = {n: tuple(m.weight.shape) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    names = checkpoint_names(modules, weight_shapes)
    if not names:
        raise CalibrationError(f"{display(folder)}: no Linear module of the model matches a "
                               "weight of the checkpoint files")

    def batches():
        for i in range(0, len(samples), batch_size):
            enc = tok(samples[i:i + batch_size], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            yield dict(enc)

    ctx = collect_calibration(model, batches(), layers=lambda n, m: n in names,
                              hessian=hessian, progress=progress, n_threads=n_threads)
    out = CalibrationContext(num_samples=ctx.num_samples)
    for mod in ctx.layer_names:
        out.add_layer_stats(names[mod], ctx.get_stats(mod))
    left_out = sorted(set(modules) - set(names))
    return out, left_out
