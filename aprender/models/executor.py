"""The block executor: a transformers model run one block at a time from its memory-mapped
safetensors checkpoint, with the calibration statistics collected on the way.

1. The config is read with aprender's strict JSON reader and built by transformers from the
   ``model_type`` it knows (``auto_map``, custom code and unknown families are refused: code
   from a model folder never runs).  The skeleton comes from ``from_config`` with every
   parameter on the meta device (no weights allocated, no architecture code of ours).
2. Every checkpoint tensor is named for the skeleton through transformers' own conversion
   mapping (renamings; per-expert tensors merged into fused 3-D expert parameters), and checked
   against the skeleton's shapes before anything runs.  Weights come only from the safetensors
   files aprender's hardened reader validated (:class:`aprender.io.checkpoint.Checkpoint`).
3. One pass with every block replaced by a recorder captures, per batch, the first block's
   hidden states and the arguments the model passes each block (attention mask, position ids
   or embeddings, per-layer masks…); the embeddings' weights are loaded only while they run.
4. Per block, in order: its weights are materialised from the memory map in the compute dtype,
   every batch runs through it with the statistic hooks on, its outputs become the next block's
   inputs, the weights are freed.  Hidden states are kept in the compute dtype, in memory while
   both sets (inputs and outputs) fit the memory budget, else in a scratch file next to the
   output that is unlinked as soon as it is created (nothing is left behind, whatever stops
   the run).
5. When a Linear outside the blocks has a weight in the checkpoint (an untied ``lm_head``, a
   pooler), one more pass runs the final norm and heads on the last block's outputs.

Statistics: :class:`~aprender.pruning.ActivationStats` per Linear (and router) named as the
checkpoint names its weight; per MoE expert, its projections' inputs over exactly the tokens
routed to it and its REAP statistics; per block, the sum of ``cos(h_in, h_out)`` over real
tokens.  Padding never counts.
"""
import inspect
import math
import os
import re
import warnings

import numpy as np

from .._validation import short_repr
from ..errors import CalibrationError, InvalidArgumentError, PruningError
from ..io.checkpoint import (MAX_JSON_BYTES, Checkpoint, check_module_counts, read_json,
                             refuse_own_code)
from ..io.files import display, temp_name

__all__ = ["BlockExecutor", "DEFAULT_MEMORY_BUDGET", "load_config", "load_tokenizer",
           "calibrate_folder", "parse_size"]

DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of hidden states (inputs + outputs) kept in memory
DTYPES = ("float32", "bfloat16")


def _deps():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError("aprender calibrate needs PyTorch and transformers: "
                          "pip install \"aprender[calibrate]\"") from exc
    return torch, transformers


def parse_size(text):
    """Bytes from '512M', '4G', '1.5GiB', '100000' (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise InvalidArgumentError(f"not a size: {short_repr(text)} (use e.g. 512M, 4G)")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if not math.isfinite(value) or value > 1 << 62:
        raise InvalidArgumentError(f"size too large: {short_repr(text)}")
    return int(value)


PAUSE_ENV = "APRENDER_TEST_PAUSE_AFTER_BLOCK"


def _test_pause():
    """Test-only (APRENDER_TEST_PAUSE_AFTER_BLOCK=1): stop after the first block, say so on
    stderr and wait for a signal, so signal tests need no timing."""
    import sys
    import time

    print("aprender-test: paused", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.05)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return short_repr(text[0], 200)[1:-1] if text else type(exc).__name__


# -- config and tokenizer ---------------------------------------------------------------------
def load_config(folder):
    """The model's transformers config, built from ``config.json`` (read strictly) by the
    config class transformers has for its ``model_type``; never code from the folder."""
    _, transformers = _deps()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(os.fspath(folder), "config.json")
    shown = display(path)
    if not os.path.lexists(path):
        raise CalibrationError(f"{shown}: no config.json (a Hugging Face model folder is needed)")
    d = read_json(path, shown)
    if not isinstance(d, dict):
        raise CalibrationError(f"{shown}: not a JSON object")
    refuse_own_code(d, shown, error=CalibrationError)
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise CalibrationError(f"{shown}: model_type {short_repr(mt)} is not a family this "
                               f"transformers ({transformers.__version__}) knows")
    check_module_counts(d, sum(1 for _ in Checkpoint(folder).items()), shown,
                        error=CalibrationError)
    try:
        cfg = CONFIG_MAPPING[mt].from_dict({k: v for k, v in d.items()
                                            if k not in ("transformers_version",)})
    except Exception as exc:  # noqa: BLE001 - any failure of the config class is the folder's
        raise CalibrationError(f"{shown}: transformers refuses this config "
                               f"({_first_line(exc)})") from None
    return cfg


# the files transformers' tokenizers read (the largest real ones are tens of MB)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(folder):
    """The folder's tokenizer (offline, never remote code)."""
    _, transformers = _deps()
    folder = os.fspath(folder)
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.lexists(tc):
        d = read_json(tc, display(tc))
        refuse_own_code(d, display(tc), "tokenizer", error=CalibrationError)
    for name in _TOKENIZER_FILES:  # parsed whole by the tokenizer libraries: bound them first
        path = os.path.join(folder, name)
        size = os.stat(path).st_size if os.path.isfile(path) else 0
        if size > MAX_JSON_BYTES:
            raise CalibrationError(f"{display(path)}: {size} bytes is too large for a tokenizer "
                                   f"file (limit {MAX_JSON_BYTES})")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"{display(folder)}: transformers cannot load the tokenizer "
                               f"offline ({_first_line(exc)})") from None


def tokenize(tok, samples, *, max_length, batch_size, vocab_size=None):
    """Batches {input_ids, attention_mask} (torch int64), right-padded by hand with the
    tokenizer's pad id (0 without one, or when it is outside ``vocab_size``: the attention
    mask excludes padding).  A token id outside ``vocab_size`` is a CalibrationError."""
    torch, _ = _deps()
    try:
        enc = tok(list(samples), truncation=True, max_length=max_length, padding=False,
                  add_special_tokens=True)["input_ids"]
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"the tokenizer fails on the calibration text "
                               f"({_first_line(exc)})") from None
    rows = [list(r)[:max_length] for r in enc if len(r)]
    if not rows:
        raise CalibrationError("the calibration text tokenizes to no tokens")
    pad = getattr(tok, "pad_token_id", None)
    if not isinstance(pad, int) or pad < 0 or (vocab_size is not None and pad >= vocab_size):
        pad = 0
    if vocab_size is not None:
        top = max(max(r) for r in rows)
        low = min(min(r) for r in rows)
        if top >= vocab_size or low < 0:
            bad = top if top >= vocab_size else low
            raise CalibrationError(f"the tokenizer gives token id {bad}, outside the model's "
                                   f"vocabulary of {vocab_size}")
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# -- the skeleton ------------------------------------------------------------------------------
class _MetaParameters:
    """Within it, every parameter a module registers goes to the meta device (buffers stay
    real: rotary frequencies and position ids are computed, not stored)."""

    def __enter__(self):
        torch, _ = _deps()
        self.old = torch.nn.Module.register_parameter
        old = self.old

        def register(module, name, param):
            if param is not None and param.device.type != "meta":
                param = type(param)(param.to("meta"), requires_grad=False)
            old(module, name, param)

        torch.nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc):
        torch, _ = _deps()
        torch.nn.Module.register_parameter = self.old
        return False


def _model_class(cfg, transformers):
    """The class named by config.architectures when transformers has it for this config, else
    AutoModel's class for the config."""
    from transformers import PreTrainedModel

    for name in getattr(cfg, "architectures", None) or ():
        cls = getattr(transformers, name, None) if isinstance(name, str) and \
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and \
                isinstance(cfg, cls.config_class):
            return cls
    return None


def _shape(t):
    return tuple(int(n) for n in t.shape)


class _Source:
    """Where one skeleton parameter comes from: one checkpoint tensor, or per-expert tensors
    merged (``parts[i][e]``: the checkpoint name of source pattern i, expert e)."""

    __slots__ = ("name", "parts")

    def __init__(self, name=None, parts=None):
        self.name, self.parts = name, parts


class _Skeleton:
    def __init__(self, folder, cfg, dtype):
        torch, transformers = _deps()
        self.torch = torch
        self.folder = os.fspath(folder)
        self.ckpt = Checkpoint(self.folder)
        self.tensors = {t.name: (s, t) for s, t in self.ckpt.items()}
        self.dtype = dtype
        cfg.use_cache = False
        try:
            cls = _model_class(cfg, transformers)
            with _MetaParameters(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if cls is not None:
                    model = cls._from_config(cfg, dtype=dtype)
                else:
                    model = transformers.AutoModel.from_config(cfg, dtype=dtype)
        except PruningError:
            raise
        except Exception as exc:  # noqa: BLE001 - a config the family's code cannot build
            raise CalibrationError(f"{display(self.folder)}: transformers cannot build the "
                                   f"model from its config ({_first_line(exc)})") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self._owners()
        self._map_names()

    def _owners(self):
        """Parameters by identity: every (module, attribute) that holds it, one name."""
        self.groups = {}  # id -> [param, [names], [(module, attr)]]
        self.by_owner = {}  # (id(module), attr) -> group id
        self.own_key = {}  # (id(module), attr) -> the model's name for it
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                g = self.groups.setdefault(id(p), [p, [], []])
                full = f"{mname}.{pname}" if mname else pname
                if full not in g[1]:
                    g[1].append(full)
                if (id(mod), pname) not in self.by_owner:
                    g[2].append((mod, pname))
                    self.by_owner[(id(mod), pname)] = id(p)
                    self.own_key[(id(mod), pname)] = full

    def _map_names(self):
        """self.source[model key] for every parameter and stored buffer, checked."""
        model = self.model
        meta_sd = {k: True for k in model.state_dict(keep_vars=True)}
        prefix = getattr(model, "base_model_prefix", "") or None
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                         rename_source_key)
        except ImportError:  # transformers 4: modules are named as the checkpoint stores them
            WeightConverter = WeightRenaming = ()  # noqa: N806
            get_model_conversion_mapping = None

            def rename_source_key(name, _renamings, _converters, prefix, meta):
                if prefix and name.startswith(prefix + ".") and \
                        name[len(prefix) + 1:] in meta:
                    return name[len(prefix) + 1:], None
                if prefix and f"{prefix}.{name}" in meta:
                    return f"{prefix}.{name}", None
                return name, None
        try:
            transforms = get_model_conversion_mapping(model) if get_model_conversion_mapping \
                else []
        except Exception:  # noqa: BLE001 - no mapping: names are used as stored
            transforms = []
        if get_model_conversion_mapping is None and any(
                isinstance(getattr(m, "experts", None), self.torch.nn.ModuleList)
                for m in model.modules()):
            raise CalibrationError("calibrating a mixture-of-experts model needs transformers "
                                   ">= 5 (per-expert statistics over routed real tokens)")
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        direct, fused = {}, {}
        for name in self.tensors:
            try:
                key, pattern = rename_source_key(name, renamings, converters, prefix, meta_sd)
            except Exception:  # noqa: BLE001
                key, pattern = name, None
            if pattern is None:
                if key in meta_sd and key not in direct:
                    direct[key] = name
                elif key not in meta_sd:
                    self._beyond_the_config(name, key, meta_sd)
                continue
            conv = next(c for c in converters if pattern in c.source_patterns)
            fused.setdefault(key, (conv, {}))[1].setdefault(pattern, []).append(name)
        self.source = {k: _Source(name=v) for k, v in direct.items()}
        for key, (conv, by_pattern) in fused.items():
            if key not in meta_sd:
                continue
            ops = [(type(o).__name__, getattr(o, "dim", None)) for o in conv.operations]
            if ops not in ([("MergeModulelist", 0)],
                           [("MergeModulelist", 0), ("Concatenate", 1)]):
                raise CalibrationError(f"{display(self.folder)}: {key}: transformers converts "
                                       f"it with {ops}, which aprender cannot stream yet")
            parts = []
            for pat in conv.source_patterns:
                names = by_pattern.get(pat, [])
                rx = re.compile(re.escape(pat.lstrip("^")).replace(r"\*", r"(\d+)"))
                idx = {}
                for n in names:
                    m = rx.search(n)
                    if m is None or not m.groups():
                        raise CalibrationError(f"{display(self.folder)}: cannot tell the expert "
                                               f"of tensor {short_repr(n)}")
                    idx[int(m.group(1))] = n
                if sorted(idx) != list(range(len(idx))) or not idx:
                    raise CalibrationError(f"{display(self.folder)}: the experts of {key} are "
                                           f"not numbered 0..N-1 in the checkpoint")
                parts.append([idx[e] for e in range(len(idx))])
            self.source[key] = _Source(parts=parts)
        self._check()

    def _beyond_the_config(self, name, key, meta_sd):
        """A checkpoint tensor the model has no place for, but would have with another index
        (``layers.5.`` of a model configured with fewer blocks, or the like): the config
        describes a smaller model than the weights, and calibrating that would be silently
        partial.  Other unplaced tensors (buffers older versions stored) are ignored."""
        for m in re.finditer(r"\.(\d+)\.", key):
            if int(m.group(1)) and f"{key[:m.start(1)]}0{key[m.end(1):]}" in meta_sd:
                raise CalibrationError(f"{display(self.folder)}: tensor {short_repr(name)} has "
                                       f"index {m.group(1)}, beyond what the config builds "
                                       "(the config and the weights disagree)")

    def stored_shape(self, src):
        if src.name is not None:
            return tuple(self.tensors[src.name][1].shape)
        shapes = [[tuple(self.tensors[n][1].shape) for n in part] for part in src.parts]
        for part in shapes:
            if len(set(part)) != 1:
                raise CalibrationError(f"{display(self.folder)}: the experts' tensors differ in "
                                       f"shape ({part[0]} and others)")
        first = shapes[0][0]
        if len(first) != 2 or any(len(p[0]) != 2 or p[0][1] != first[1] for p in shapes):
            raise CalibrationError(f"{display(self.folder)}: expert tensors of shapes "
                                   f"{[p[0] for p in shapes]} cannot be merged")
        return (len(shapes[0]), sum(p[0][0] for p in shapes), first[1])

    def _check(self):
        """Every parameter has a source of its shape (one of its tied names is enough)."""
        self.param_source = {}
        for gid, (p, names, _) in self.groups.items():
            src = next((self.source[n] for n in names if n in self.source), None)
            if src is None:
                raise CalibrationError(f"{display(self.folder)}: tensor {short_repr(names[0])} "
                                       "is missing from the checkpoint (the config and the "
                                       "weights disagree)")
            have, want = self.stored_shape(src), _shape(p)
            if have != want:
                shown = src.name or src.parts[0][0]
                raise CalibrationError(f"{display(self.folder)}: tensor {short_repr(shown)} has "
                                       f"shape {have} in the checkpoint but the config implies "
                                       f"{want} (the config and the weights disagree)")
            code = self.tensors[src.name or src.parts[0][0]][1].dtype
            if p.is_floating_point() and code not in ("BF16", "F16", "F32", "F64"):
                shown = src.name or src.parts[0][0]
                raise CalibrationError(f"{display(self.folder)}: tensor {short_repr(shown)} is "
                                       f"{code}, but the model's parameter {short_repr(names[0])}"
                                       " holds floating-point values (the config and the "
                                       "weights disagree)")
            self.param_source[gid] = src
        self.buffer_source = {}
        for mname, mod in self.model.named_modules():
            for bname, b in mod._buffers.items():
                key = f"{mname}.{bname}" if mname else bname
                src = self.source.get(key)
                if b is None or src is None or src.name is None:
                    continue
                if tuple(self.tensors[src.name][1].shape) != _shape(b):
                    raise CalibrationError(f"{display(self.folder)}: tensor "
                                           f"{short_repr(src.name)} has the wrong shape")
                self.buffer_source[(mod, bname)] = src.name

    # -- weights -----------------------------------------------------------------------------
    def read(self, name, dtype):
        torch = self.torch
        shard, info = self.tensors[name]
        sf = self.ckpt.files[shard]
        code = info.dtype
        if code == "BF16":
            t = torch.from_numpy(np.asarray(sf.words(name)).view(np.int16)).view(torch.bfloat16)
        elif code in ("F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"):
            np_dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64,
                        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                        "U8": np.uint8, "BOOL": np.bool_}[code]
            t = torch.from_numpy(np.asarray(sf.words(name)).view(np_dtype))
        else:
            raise CalibrationError(f"{display(self.folder)}: tensor {short_repr(name)} has dtype "
                                   f"{code}, which calibration cannot compute with")
        t = t.reshape(tuple(info.shape))
        if dtype is not None and t.is_floating_point():
            return t.to(dtype, copy=True)
        return t.clone()

    def _value(self, src):
        torch = self.torch
        if src.name is not None:
            return self.read(src.name, self.dtype)
        merged = [torch.stack([self.read(n, self.dtype) for n in part]) for part in src.parts]
        return merged[0] if len(merged) == 1 else torch.cat(merged, dim=1)

    def materialise_own(self, module):
        return self.materialise(module, recurse=False)

    def materialise(self, module, recurse=True):
        """Load every parameter (and stored buffer) of ``module`` (and below it, with
        ``recurse``) that is still on the meta device; returns the group ids loaded."""
        loaded = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memory maps: we copy at once
            for mod in (module.modules() if recurse else (module,)):
                for pname, p in list(mod._parameters.items()):
                    if p is None or p.device.type != "meta":
                        continue
                    gid = self._gid(mod, pname)
                    value = self.torch.nn.Parameter(self._value(self.param_source[gid]),
                                                    requires_grad=False)
                    for owner, attr in self.groups[gid][2]:
                        owner._parameters[attr] = value
                    loaded.append(gid)
                for bname in list(mod._buffers):
                    name = self.buffer_source.get((mod, bname))
                    if name is not None:
                        mod._buffers[bname] = self.read(name, None).to(mod._buffers[bname].dtype)
        return loaded

    def _gid(self, mod, pname):
        return self.by_owner[(id(mod), pname)]

    def free(self, gids):
        """Put the parameters of ``gids`` back on the meta device."""
        for gid in gids:
            meta = self.groups[gid][0]
            for owner, attr in self.groups[gid][2]:
                owner._parameters[attr] = meta

    def key_of(self, mod, pname="weight"):
        """The checkpoint name of a module's own parameter (None when it is merged, absent,
        or stored only under another name it is tied to: a tied head has no weight of its
        own)."""
        src = self.source.get(self.own_key.get((id(mod), pname)))
        return src.name if src is not None else None


def _blocks(model, torch):
    """(name, ModuleList) of the repeated blocks: the ModuleList of same-class modules that
    holds the most parameters."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise CalibrationError("the model has no list of repeated blocks to run one at a time")
    return best[1], best[2]


class _Stop(Exception):
    pass


# -- hidden states -----------------------------------------------------------------------------
class _HiddenStates:
    """Two sets (block inputs, block outputs) of per-batch hidden states in the compute dtype:
    in memory while both fit ``budget`` bytes, else in one scratch file next to ``near``,
    unlinked at once (the space is returned when the map is closed, even on SIGKILL)."""

    def __init__(self, dtype, budget, near, torch):
        self.torch, self.dtype, self.budget, self.near = torch, dtype, budget, near
        self.scratch = None
        self.sides = None

    def allocate(self, shapes):
        torch, dtype, budget, near = self.torch, self.dtype, self.budget, self.near
        self.shapes = shapes
        item = torch.empty((), dtype=dtype).element_size()
        self.sizes = [int(np.prod(s)) for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.nbytes = 2 * total * item
        self.sides = [[None] * len(shapes), [None] * len(shapes)]
        if self.nbytes > budget:
            self.np_dtype = np.int16 if dtype == torch.bfloat16 else np.float32
            path = temp_name(near, "file")
            try:
                f = open(path, "r+b")
            finally:
                os.unlink(path)
            try:
                f.truncate(self.nbytes)
                self.scratch = np.memmap(f, dtype=self.np_dtype, mode="r+", shape=(2 * total,))
            finally:
                f.close()
            self.total = total

    def put(self, side, i, t):
        if self.scratch is None:
            self.sides[side][i] = t.detach().to(self.dtype).contiguous()
            return
        base = side * self.total + int(self.offsets[i])
        dst = self.scratch[base:base + self.sizes[i]]
        src = t.detach().to(self.dtype).contiguous().reshape(-1)
        if self.dtype == self.torch.bfloat16:
            src = src.view(self.torch.int16)
        dst[:] = src.numpy()

    def get(self, side, i):
        if self.scratch is None:
            return self.sides[side][i]
        base = side * self.total + int(self.offsets[i])
        t = self.torch.from_numpy(self.scratch[base:base + self.sizes[i]])
        if self.dtype == self.torch.bfloat16:
            t = t.view(self.torch.bfloat16)
        return t.reshape(self.shapes[i])

    def close(self):
        self.sides = None
        if self.scratch is not None:
            mm = getattr(self.scratch, "_mmap", None)
            self.scratch = None
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass


# -- the executor ------------------------------------------------------------------------------
class BlockExecutor:
    """Run a Hugging Face model folder one block at a time and collect calibration statistics.

    ``dtype``: "float32" (default) or "bfloat16", the compute dtype of weights and hidden
    states.  ``memory_budget``: bytes of hidden states kept in memory (both sets); over it they
    go to a scratch file created next to ``scratch_near`` (default: the system's temporary
    folder)."""

    def __init__(self, folder, *, dtype="float32", memory_budget=DEFAULT_MEMORY_BUDGET,
                 scratch_near=None, n_threads=None, config=None):
        torch, _ = _deps()
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got "
                                       f"{short_repr(dtype)}")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or \
                memory_budget < 0:
            raise InvalidArgumentError(f"memory_budget must be a number of bytes >= 0, got "
                                       f"{short_repr(memory_budget)}")
        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.memory_budget = memory_budget
        if scratch_near is None:
            import tempfile
            scratch_near = os.path.join(tempfile.gettempdir(), "aprender-calibration")
        self.scratch_near = scratch_near
        self.n_threads = n_threads
        self.config = config if config is not None else load_config(folder)
        self.sk = _Skeleton(folder, self.config, self.dtype)
        self.scratch_used = False

    def calibrate(self, batches, *, hessian=False, progress=False):
        """Run ``batches`` (dicts with ``input_ids`` and ``attention_mask``, int64 (batch,
        seq)) and return a CalibrationContext (layer, block and expert statistics) and the
        Linear modules left out (no weight of their own in the checkpoint, e.g. a tied head).
        torch's intra-op threads are bounded by ``n_threads`` while it runs (restored after),
        and the statistic hooks' BLAS calls run on one thread beside torch's team."""
        from .._threads import limit_pools

        with limit_pools(self.n_threads, serial_blas=True, torch=True):
            return self._calibrate(batches, hessian, progress)

    def _calibrate(self, batches, hessian, progress):
        from ..pruning.calibration import CalibrationContext
        from ..torch import StatHooks

        torch, sk, model = self.torch, self.sk, self.sk.model
        batches = list(batches)
        if not batches:
            raise CalibrationError("no calibration batches")
        masks = []
        for b in batches:
            m = b.get("attention_mask")
            masks.append(None if m is None else (m != 0).numpy())
        hooks = StatHooks(hessian=hessian, n_threads=self.n_threads)
        ctx = CalibrationContext(num_samples=sum(int(b["input_ids"].shape[0]) for b in batches))
        list_name, blocks = _blocks(model, torch)
        block_ids = {id(m) for blk in blocks for m in blk.modules()}
        outside = [m for m in model.modules() if id(m) not in block_ids]
        calls = [[None] * len(blocks) for _ in batches]
        store = _HiddenStates(self.dtype, self.memory_budget, self.scratch_near, torch)
        lazy = []
        try:
            with torch.no_grad():
                lazy = self._lazy_outside(outside)
                self._capture(batches, blocks, calls, store)
                self._free_outside()
                self.scratch_used = store.scratch is not None
                it = range(len(blocks))
                if progress:
                    it = _progress(it, len(blocks))
                side = 0
                for k in it:
                    self._run_block(k, list_name, blocks[k], batches, masks, calls, store,
                                    side, hooks, ctx)
                    side ^= 1
                    if k == 0 and os.environ.get(PAUSE_ENV) == "1":
                        _test_pause()
                left_out = self._tail(outside, blocks, batches, masks, calls, store, side,
                                      hooks)
        finally:
            for h in lazy:
                h.remove()
            hooks.remove()
            self._free_outside()
            store.close()
        stats = hooks.finish()
        for name in stats:  # the order the model runs them
            ctx.add_layer_stats(name, stats[name])
        return ctx, left_out

    # -- passes ------------------------------------------------------------------------------
    def _lazy_outside(self, outside):
        """Pre-hooks that load an outside module's own weights the first time it runs."""
        self._outside_loaded = []
        handles = []
        for mod in outside:
            if not any(p is not None for p in mod._parameters.values()):
                continue

            def hook(m, args, kwargs):
                self._outside_loaded += self.sk.materialise_own(m)
                return None
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _free_outside(self):
        self.sk.free(getattr(self, "_outside_loaded", []))
        self._outside_loaded = []

    def _call(self, batch):
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        return kwargs

    def _capture(self, batches, blocks, calls, store):
        """Per batch: the first block's hidden states (into side 0 of ``store``), and every
        block's call arguments."""
        current = {}

        def recorder(k):
            def forward(*args, **kwargs):
                if args:
                    h, rest, where = args[0], args[1:], "arg"
                else:
                    kwargs = dict(kwargs)
                    h, rest, where = kwargs.pop("hidden_states"), (), "kw"
                calls[current["batch"]][k] = (where, rest, kwargs)
                if k == 0:
                    i = current["batch"]
                    if i == 0:
                        store.allocate([tuple(b["input_ids"].shape) + tuple(h.shape[2:])
                                        for b in batches])
                    if _shape(h) != store.shapes[i]:
                        raise CalibrationError(f"the first block's input has shape "
                                               f"{_shape(h)}, not (batch, tokens, hidden) "
                                               f"{store.shapes[i]}")
                    store.put(0, i, h)
                if self._tuple_out is None:
                    self._tuple_out = self._probe(blocks[0], (h,) + rest, kwargs) \
                        if where == "arg" else self._probe(blocks[0], rest,
                                                           dict(kwargs, hidden_states=h))
                if k == len(blocks) - 1:
                    raise _Stop
                return (h,) if self._tuple_out else h
            return forward

        self._tuple_out = None

        for k, blk in enumerate(blocks):
            blk.forward = recorder(k)
        try:
            for i, b in enumerate(batches):
                current["batch"] = i
                try:
                    self.sk.model(**self._call(b))
                except _Stop:
                    pass
                except PruningError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationError(f"the model's embeddings fail on batch {i} "
                                           f"({_first_line(exc)})") from None
                if any(c is None for c in calls[i]):
                    raise CalibrationError("the model did not call every block (early exit or "
                                           "an unsupported family)")
        finally:
            for blk in blocks:
                blk.__dict__.pop("forward", None)

    def _probe(self, block, args, kwargs):
        """Whether the block returns a tuple (transformers 4's layers) or the hidden states
        (transformers 5's): the recorders standing in for the blocks must return the same.
        Runs the real block once, on the first batch."""
        loaded = self.sk.materialise(block)
        try:
            out = type(block).forward(block, *args, **kwargs)
        except PruningError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"the first block fails ({_first_line(exc)})") from None
        finally:
            self.sk.free(loaded)
        return isinstance(out, (tuple, list))

    def _run_block(self, k, list_name, blk, batches, masks, calls, store, side, hooks, ctx):
        torch, sk = self.torch, self.sk
        loaded = sk.materialise(blk)
        attached = []
        try:
            prefix = self._block_prefix(f"{list_name}.{k}" if list_name else str(k), blk)
            taps = self._attach_block(blk, f"{list_name}.{k}", hooks)
            cos_sum, tokens = 0.0, 0
            for i, _ in enumerate(batches):
                h = store.get(side, i)
                where, rest, kwargs = calls[i][k]
                hooks.start_batch(masks[i])
                for tap in taps:
                    tap.mask = masks[i]
                try:
                    out = blk(h, *rest, **kwargs) if where == "arg" else \
                        blk(*rest, hidden_states=h, **kwargs)
                except PruningError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationError(f"block {prefix} fails on batch {i} "
                                           f"({_first_line(exc)})") from None
                hooks.end_batch()
                if isinstance(out, (tuple, list)):
                    out = out[0]
                c = torch.nn.functional.cosine_similarity(h.to(torch.float64),
                                                          out.to(torch.float64), dim=-1)
                if masks[i] is not None:
                    sel = torch.from_numpy(masks[i])
                    cos_sum += float(c[sel].sum())
                    tokens += int(sel.sum())
                else:
                    cos_sum += float(c.sum())
                    tokens += c.numel()
                store.put(side ^ 1, i, out)
            ctx.add_block_stats(prefix, cos_sum, tokens)
            for tap in taps:
                tap.flush(ctx)
                attached.append(tap)
        finally:
            hooks.remove()
            for tap in attached:
                tap.remove()
            sk.free(loaded)

    def _block_prefix(self, model_name, blk):
        """The block's name as the checkpoint names it (``model.layers.3``)."""
        for pname, p in blk.named_parameters():
            key = self.sk.key_of(*_owner(blk, pname))
            if key is not None and key.endswith("." + pname):
                return key[:-len(pname) - 1]
        return model_name

    def _attach_block(self, blk, model_name, hooks):
        """Statistic hooks on the block's Linear-like modules and expert taps."""
        torch, sk = self.torch, self.sk
        taps = []
        # the modules beside the experts (router, shared expert and its gate) read the
        # batch's tokens flattened to (batch * seq, hidden), in order: the token mask applies
        flat = set()
        for name, mod in blk.named_modules():
            if _is_experts(mod):
                parent = blk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else blk
                flat |= {id(m) for m in parent.modules() if m is not mod}
        for name, mod in blk.named_modules():
            if _is_experts(mod):
                taps.append(_ExpertTap(self, mod, hooks))
                continue
            w = mod._parameters.get("weight")
            if w is None or w.dim() != 2 or isinstance(mod, torch.nn.Embedding):
                continue
            key = sk.key_of(mod)
            if key is None or not key.endswith(".weight"):
                continue
            width = int(w.shape[0]) if type(mod).__name__ == "Conv1D" else int(w.shape[1])
            hooks.attach(key[:-len(".weight")], mod, in_features=width, flat=id(mod) in flat)
        return taps

    def _tail(self, outside, blocks, batches, masks, calls, store, side, hooks):
        """Statistics of the Linear modules outside the blocks that have weights of their own
        in the checkpoint (an untied lm_head, a pooler): one pass of the model with the blocks
        replaced by the last block's outputs.  Returns the Linear modules left out."""
        torch, sk = self.torch, self.sk
        linears = [(n, m) for n, m in sk.model.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        inside = {id(m) for blk in blocks for m in blk.modules()}
        left_out = sorted(n for n, m in linears if sk.key_of(m) is None)
        wanted = [(sk.key_of(m), m) for n, m in linears
                  if id(m) not in inside and sk.key_of(m) is not None]
        if not wanted:
            return left_out
        current = {}

        def replay(k):
            def forward(*args, **kwargs):
                if k == len(blocks) - 1:
                    h = store.get(side, current["batch"])
                else:
                    h = args[0] if args else kwargs["hidden_states"]
                return (h,) if self._tuple_out else h
            return forward

        for key, mod in wanted:
            hooks.attach(key[:-len(".weight")], mod)
        for k, blk in enumerate(blocks):
            blk.forward = replay(k)
        try:
            for i, b in enumerate(batches):
                current["batch"] = i
                hooks.start_batch(masks[i])
                # zero embeddings in place of the token ids: the blocks are replaced, so the
                # input embeddings' weights (a large vocabulary) need not be loaded again
                call = self._call(b)
                ids = call.pop("input_ids")
                h = store.get(side, i)
                call["inputs_embeds"] = torch.zeros(tuple(ids.shape) + tuple(h.shape[2:]),
                                                    dtype=h.dtype)
                try:
                    sk.model(**call)
                except PruningError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationError(f"the model's head fails on batch {i} "
                                           f"({_first_line(exc)})") from None
                hooks.end_batch()
        finally:
            for blk in blocks:
                blk.__dict__.pop("forward", None)
            hooks.remove()
            self._free_outside()
        return left_out


def _owner(root, pname):
    mod = root
    parts = pname.split(".")
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


def _progress(it, total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc="calibration", unit="block")


# -- MoE experts ---------------------------------------------------------------------------------
def _is_experts(mod):
    gu = mod._parameters.get("gate_up_proj")
    down = mod._parameters.get("down_proj")
    return gu is not None and down is not None and gu.dim() == 3


class _ExpertTap:
    """A forward hook on a fused experts module (``gate_up_proj`` (E, 2I, H), ``down_proj``
    (E, H, I), called with the hidden states, the routed expert indices and their gate
    weights): per expert, the input statistics of its projections over exactly its routed
    real tokens (named as the checkpoint's per-expert tensors) and its REAP statistics."""

    def __init__(self, ex, mod, hooks):
        torch = ex.torch
        self.torch, self.mod, self.hooks, self.mask = torch, mod, hooks, None
        sk = ex.sk
        gsrc = sk.param_source[sk._gid(mod, "gate_up_proj")]
        dsrc = sk.param_source[sk._gid(mod, "down_proj")]
        if gsrc.parts is None or dsrc.parts is None or len(gsrc.parts) != 2 or \
                len(dsrc.parts) != 1 or getattr(mod, "is_transposed", False) or \
                not getattr(mod, "has_gate", True) or getattr(mod, "has_bias", False) or \
                any(n.endswith("_bias") for n in mod._parameters):
            raise CalibrationError("this family's experts are not stored as separate gate, up "
                                   "and down projections; aprender cannot name their statistics")
        e, two_i, h = _shape(mod.gate_up_proj)
        if _shape(mod.down_proj) != (e, h, two_i // 2):
            raise CalibrationError(f"unexpected expert layout {_shape(mod.gate_up_proj)} / "
                                   f"{_shape(mod.down_proj)}")
        self.names = [(gsrc.parts[0][x], gsrc.parts[1][x], dsrc.parts[0][x]) for x in range(e)]
        self.tokens = [0] * e
        self.reap = [0.0] * e
        self.handle = mod.register_forward_hook(self.hook, with_kwargs=True)
        try:
            self.sig = inspect.signature(mod.forward)
        except (TypeError, ValueError):
            self.sig = None

    def hook(self, mod, args, kwargs, output):
        torch, F = self.torch, self.torch.nn.functional
        try:
            bound = self.sig.bind(*args, **kwargs).arguments
            x, index, weights = (bound["hidden_states"], bound["top_k_index"],
                                 bound["top_k_weights"])
        except (AttributeError, TypeError, KeyError):
            raise CalibrationError("the experts module is not called with (hidden_states, "
                                   "top_k_index, top_k_weights)") from None
        x = x.reshape(-1, x.shape[-1])
        real = None
        if self.mask is not None and self.mask.size == x.shape[0]:
            real = torch.from_numpy(self.mask.reshape(-1))
        for e, (g_name, u_name, d_name) in enumerate(self.names):
            sel = index == e
            if real is not None:
                sel = sel & real[:, None]
            tok, pos = torch.where(sel)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            gate, up = F.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
            act = mod.act_fn(gate) * up
            y = F.linear(act, mod.down_proj[e])
            g = g_name[:-len(".weight")] if g_name.endswith(".weight") else g_name
            u = u_name[:-len(".weight")] if u_name.endswith(".weight") else u_name
            d = d_name[:-len(".weight")] if d_name.endswith(".weight") else d_name
            self.hooks.add(g, xe)
            self.hooks.add(u, xe, follows=g)
            self.hooks.add(d, act)
            self.tokens[e] += int(tok.numel())
            w = weights[tok, pos].to(torch.float64)
            self.reap[e] += float((w * y.to(torch.float64).norm(dim=-1)).sum())
        return None

    def flush(self, ctx):
        for e, (g_name, _, _) in enumerate(self.names):
            base = g_name[:-len(".weight")] if g_name.endswith(".weight") else g_name
            prefix = base.rsplit(".", 1)[0]
            ctx.add_expert_stats(prefix, self.tokens[e], self.reap[e])

    def remove(self):
        self.handle.remove()


# -- the front end ---------------------------------------------------------------------------
def calibrate_folder(model_dir, samples, *, max_length=None, batch_size=8, hessian=False,
                     dtype="float32", memory_budget=DEFAULT_MEMORY_BUDGET, scratch_near=None,
                     progress=False, n_threads=None):
    """(CalibrationContext named by the checkpoint's weights, [Linear modules left out]) of
    the model in ``model_dir`` over the text ``samples``, run one block at a time.
    ``max_length``: tokens per sample (default min(512, max_position_embeddings); more than
    max_position_embeddings is an error)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an integer >= 1, got "
                                   f"{short_repr(batch_size)}")
    cfg = load_config(model_dir)
    limit = getattr(cfg, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
        else None
    if max_length is None:
        max_length = min(512, limit) if limit else 512
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidArgumentError(f"max_length must be an integer >= 1, got "
                                   f"{short_repr(max_length)}")
    elif limit is not None and max_length > limit:
        raise CalibrationError(f"max_length {max_length} is more than the model's "
                               f"max_position_embeddings ({limit})")
    ex = BlockExecutor(model_dir, dtype=dtype, memory_budget=memory_budget,
                       scratch_near=scratch_near, n_threads=n_threads, config=cfg)
    tok = load_tokenizer(model_dir)
    vocab = getattr(cfg, "vocab_size", None)
    batches = tokenize(tok, samples, max_length=max_length, batch_size=batch_size,
                       vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None)
    ctx, left_out = ex.calibrate(batches, hessian=hessian, progress=progress)
    ctx.num_samples = len(samples)  # a sample that tokenizes to nothing still counts
    return ctx, left_out
