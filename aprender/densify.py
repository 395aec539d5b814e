"""Turn a compressed checkpoint back into a dense one: the work behind ``aprender densify``.

Reads aprender's ``bitmask`` and ``sparse-24-bitmask`` outputs and compressed-tensors
``sparse-24-bitmask`` checkpoints written by other tools (see :mod:`aprender.io.formats`);
writes every logical tensor densely, in the input's order, with +0.0 at pruned positions.  On
aprender's own outputs the result is byte-identical to ``aprender prune --format dense`` with the
same options (the ``aprender`` metadata's ``format`` becomes ``dense``).  The sparsity section of
``config.json`` is removed (and ``quantization_config`` with it when nothing else is left in
it); a folder's index is rebuilt for the dense names.

Safety and streaming are those of ``aprender prune``: one tensor in memory at a time, output
built under a temporary name and renamed into place, inputs never touched
(:class:`aprender.io.files.OutputTarget`, :class:`aprender.io.checkpoint.CheckpointWriter`).
"""
import json
import os
import time

from ._validation import resolve_threads
from .errors import CheckpointError
from .io.checkpoint import Checkpoint, CheckpointWriter
from .io.files import OutputTarget, display
from .io.formats import BITMASK_CONFIG, aprender_info, checkpoint_layout, decode

__all__ = ["densify_checkpoint", "dense_config"]

# quantization_config keys that carry no quantization of their own
_BOOKKEEPING = ("quant_method", "version", "transform_config", "sparsity_config")


def dense_config(cfg):
    """``cfg`` (a config.json object) without its sparsity config; the returned flag says
    whether anything changed."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or "sparsity_config" not in qc:
        return cfg, False
    qc = {k: v for k, v in qc.items() if k != "sparsity_config"}
    rest = {k: v for k, v in qc.items() if k not in _BOOKKEEPING}
    if rest.get("format") == "dense" and "config_groups" not in rest:
        rest.pop("format")  # the key aprender once wrote for a model that is only sparse
        qc.pop("format")
    cfg = dict(cfg)
    if rest or qc.get("transform_config"):
        cfg["quantization_config"] = qc
    else:
        del cfg["quantization_config"]
    return cfg, True


def _dense_metadata(metadata):
    """The shard metadata with aprender's recorded ``format`` set to dense (key order kept, so
    the header is the one ``prune --format dense`` writes)."""
    info = aprender_info(metadata)
    if info is None or info.get("format") in (None, "dense"):
        return metadata
    info["format"] = "dense"
    meta = dict(metadata)
    meta["aprender"] = json.dumps(info, separators=(",", ":"))
    return meta


def densify_checkpoint(input, output, *, force=False, n_threads=None, progress=None):
    """Write the dense form of checkpoint ``input`` (file or folder) to ``output``; returns a
    report dict (tensors decoded per encoding, bytes read and written).  ``progress``: called
    as ``progress(bytes_done_now, total_bytes)`` after each logical tensor."""
    t0 = time.perf_counter()
    input, output = os.fspath(input), os.fspath(output)
    nt = resolve_threads(n_threads)
    ckpt = Checkpoint(input)
    target = OutputTarget(output, ckpt.inputs, force=force,
                          kind="dir" if ckpt.is_dir else "file")
    layout = checkpoint_layout(ckpt)
    total = sum(ckpt.files[s].size for s in ckpt.shards)
    counts = {}
    writer = CheckpointWriter(ckpt, target.path, force=force)
    try:
        for s in ckpt.shards:
            sf = ckpt.files[s]
            planned = {lt.name: (lt.dtype, lt.shape, lt.nbytes) for lt in layout[s]}
            out = writer.shard(s, _dense_metadata(sf.metadata), planned)
            for lt in layout[s]:
                counts[lt.encoding] = counts.get(lt.encoding, 0) + 1
                if lt.encoding == "dense":
                    out.copy(sf, lt.parts[0])
                else:
                    words = decode(sf, lt, nt)
                    out.add(lt.name, lt.dtype, lt.shape, [words], lt.nbytes)
                    del words
                if progress is not None:
                    progress(lt.stored_bytes, total)
            out.close()
        config_changed = False
        if ckpt.is_dir:
            # a bitmask folder's config.json comes back under its own name
            restore = BITMASK_CONFIG in ckpt.others and "config.json" not in ckpt.others
            writer.copy_others({BITMASK_CONFIG: "config.json"} if restore else None)
            writer.write_index(rebuild=True)
            cfg = writer.read_output_json("config.json")
            if isinstance(cfg, dict):
                cfg, config_changed = dense_config(cfg)
                if config_changed:
                    writer.write_json("config.json", cfg)
        writer.commit()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            why = exc.strerror or str(exc)
            raise CheckpointError(f"{display(target.path)}: cannot write ({why})") from None
        raise
    written = sum(writer.sizes.values())
    return {"input": os.path.abspath(input), "output": os.path.abspath(output),
            "tensors": sum(counts.values()), "decoded": {k: v for k, v in counts.items()
                                                          if k != "dense"},
            "config_sparsity_removed": config_changed, "bytes_read": total,
            "bytes_written": written, "wall_s": time.perf_counter() - t0}
