"""Checkpoints as folders or single files: discovery, the shard index, and a streaming writer.

Reading a folder (every name in it is untrusted):

* Shards are the files named by ``model.safetensors.index.json`` (plain relative paths that stay
  inside the folder) or, without an index, the ``*.safetensors`` files at its top.
* Every other file is copied to the output as a regular file holding the same bytes, in the
  same sub-folder.  A symbolic link is followed only when its target is a regular file inside
  the checkpoint folder or, for a Hugging Face cache snapshot (``…/snapshots/<revision>/``),
  inside that repository's ``blobs/`` folder; the output gets the file's contents, never a link.
  Any other link (to a folder, outside the checkpoint, dangling) and any special file (FIFO,
  device, socket) is refused with a CheckpointError naming it.

Writing: :class:`CheckpointWriter` builds the whole output under a fresh temporary name next to
OUTPUT and renames it into place in :meth:`~CheckpointWriter.commit`; on any error or signal
:meth:`~CheckpointWriter.abort` removes it.  Temporary data (the spool of a compressed shard) is
an anonymous file that no input name can reach.
"""
import json
import math
import os
import stat
import sys
import tempfile
import time

import numpy as np

from .._validation import short_repr
from ..errors import CheckpointError
from . import strictjson
from .files import (check_member_name, commit_path, create_new, display, file_kind,
                    open_regular, remove_tree, temp_name)
from .safetensors import SafetensorsFile, copy_range, encode_header, write_all

__all__ = ["INDEX_NAME", "Checkpoint", "CheckpointWriter", "read_json", "read_json_text",
           "refuse_own_code", "check_module_counts"]

INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 100_000_000
MAX_FILES = 100_000
MAX_DEPTH = 32


def refuse_own_code(doc, where, what="model", error=CheckpointError):
    """Refuse a model folder's JSON document (``config.json``, ``tokenizer_config.json``, or a
    nested ``text_config``) that names code of its own (``auto_map``): aprender never runs code
    from a model folder, and a layout defined by such code is not one aprender's tables know."""
    if isinstance(doc, dict) and "auto_map" in doc:
        raise error(f"{where}: the {what} needs its own code (auto_map); aprender never runs "
                    "code from a model folder")


# config fields that make a model builder create that many modules (each of which holds at
# least one stored tensor): a value above the checkpoint's tensor count cannot be backed
_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "num_experts",
                 "num_local_experts", "n_routed_experts")
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_module_counts(doc, n_tensors, where, error=CheckpointError, _depth=0):
    """Bound the module counts a ``config.json`` claims (layers, experts; nested sub-configs
    too) by what the checkpoint really holds, before anything is built from them: a hostile
    ``num_hidden_layers = 10**9`` would otherwise have a builder create a billion modules.
    ``num_experts_per_tok`` must lie in [1, experts] where the config has experts (top-k
    routing beyond them fails inside the model, and 0 routes no token)."""
    if not isinstance(doc, dict) or _depth > MAX_DEPTH:
        return
    for k in _COUNT_FIELDS:
        v = doc.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > n_tensors:
            raise error(f"{where}: {k} is {v} but the checkpoint holds only {n_tensors} "
                        "tensors (the config and the weights disagree)")
    experts = next((doc[k] for k in _EXPERT_FIELDS if isinstance(doc.get(k), int) and
                    not isinstance(doc[k], bool) and doc[k] > 0), None)
    topk = doc.get("num_experts_per_tok")
    if experts is not None and "num_experts_per_tok" in doc and (
            not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= experts):
        raise error(f"{where}: num_experts_per_tok must be an integer in [1, {experts}] (the "
                    f"experts each token is routed to), got {short_repr(topk)}")
    for v in doc.values():
        if isinstance(v, dict):
            check_module_counts(v, n_tensors, where, error, _depth + 1)


def read_json(path, what=None):
    """A JSON document from an untrusted file (regular file, bounded size, strict parse)."""
    return read_json_text(path, what)[1]


def read_json_text(path, what=None):
    """(text, value) of a JSON document from an untrusted file, checked as by read_json: the
    text for edits that keep every other byte (:mod:`aprender.io.jsonedit`)."""
    what = what or display(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{what}: {size} bytes is too large for a JSON file "
                                  f"(limit {MAX_JSON_BYTES})")
        raw = f.read(MAX_JSON_BYTES + 1)
    value = strictjson.loads(raw, what)
    return raw.decode("utf-8"), value


def _hf_blobs(root_real):
    """The ``blobs`` folder of a Hugging Face cache repository when root is one of its
    snapshots (``<repo>/snapshots/<revision>``), else None."""
    snapshots = os.path.dirname(root_real)
    if os.path.basename(snapshots) != "snapshots":
        return None
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return blobs if os.path.isdir(blobs) else None


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Checkpoint:
    """A single ``.safetensors`` file or a checkpoint folder.

    ``shards``: relative names in order; ``files[shard]``: its SafetensorsFile; ``others``:
    relative names of the other files to copy; ``real[name]``: the regular file behind a name;
    ``inputs``: every real path that is read (for output checks)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        shown = display(self.path)
        try:
            st = os.stat(self.path)
        except OSError:
            raise CheckpointError(f"{shown}: no such file or folder") from None
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.index = None
        self.others = []
        self.real = {}
        if self.is_dir:
            self._scan_folder()
        elif stat.S_ISREG(st.st_mode):
            name = os.path.basename(self.path.rstrip(os.sep))
            self.shards = [name]
            self.real[name] = os.path.realpath(self.path)
        else:
            raise CheckpointError(f"{shown}: is a {file_kind(st.st_mode)}, not a regular file "
                                  "or folder")
        self.inputs = [self.path] + list(self.real.values())
        self.files = {s: SafetensorsFile(self.shard_path(s)) for s in self.shards}
        if self.index is not None:
            for name, s in self.index["weight_map"].items():
                if name not in self.files[s]:
                    raise CheckpointError(f"{display(self.shard_path(s))}: tensor "
                                          f"{short_repr(name)} listed in {INDEX_NAME} is missing")

    # -- folder discovery ------------------------------------------------------------------
    def _scan_folder(self):
        root = os.path.realpath(self.path)
        allowed = [root]
        blobs = _hf_blobs(root)
        if blobs is not None:
            allowed.append(os.path.realpath(blobs))
        found = []
        stack = [("", 0)]
        while stack:
            rel, depth = stack.pop()
            folder = os.path.join(self.path, rel) if rel else self.path
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise CheckpointError(f"{display(folder)}: cannot list ({exc.strerror})") \
                    from None
            for e in entries:
                name = f"{rel}/{e.name}" if rel else e.name
                shown = display(os.path.join(self.path, name))
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not any(_inside(target, a) for a in allowed):
                        raise CheckpointError(f"{shown}: symbolic link to {display(target)}, "
                                              "outside the checkpoint; refused")
                    try:
                        mode = os.stat(e.path).st_mode
                    except OSError:
                        raise CheckpointError(f"{shown}: dangling symbolic link") from None
                    if not stat.S_ISREG(mode):
                        raise CheckpointError(f"{shown}: symbolic link to a "
                                              f"{file_kind(mode)}; only links to regular "
                                              "files are followed")
                    found.append(name)
                    self.real[name] = target
                    continue
                mode = e.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    if depth + 1 >= MAX_DEPTH:
                        raise CheckpointError(f"{shown}: folders nested deeper than "
                                              f"{MAX_DEPTH} levels")
                    stack.append((name, depth + 1))
                elif stat.S_ISREG(mode):
                    found.append(name)
                    self.real[name] = os.path.realpath(e.path)
                else:
                    raise CheckpointError(f"{shown}: is a {file_kind(mode)}; checkpoints may "
                                          "hold only regular files and folders")
                if len(found) > MAX_FILES:
                    raise CheckpointError(f"{display(self.path)}: more than {MAX_FILES} files")
        found.sort()
        if INDEX_NAME in self.real:
            self._read_index()
            shards = list(dict.fromkeys(self.index["weight_map"].values()))
            for s in shards:
                if s not in self.real:
                    raise CheckpointError(f"{display(os.path.join(self.path, s))}: shard "
                                          f"listed in {INDEX_NAME} is missing")
        else:
            shards = [n for n in found if "/" not in n and n.endswith(".safetensors")]
        if not shards:
            raise CheckpointError(f"{display(self.path)}: no .safetensors files in this folder")
        skip = set(shards) | {INDEX_NAME}
        self.others = [n for n in found if n not in skip]
        self.shards = shards

    def _read_index(self):
        where = display(os.path.join(self.path, INDEX_NAME))
        index = read_json(os.path.join(self.path, INDEX_NAME), where)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{where}: unreadable index (no \"weight_map\" object)")
        for name, shard in index["weight_map"].items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{where}: tensor {short_repr(name)} maps to "
                                      f"{short_repr(shard)}, not a file name")
            check_member_name(shard, where)
        self.index = index

    # -- access ------------------------------------------------------------------------------
    def shard_path(self, shard):
        return os.path.join(self.path, shard) if self.is_dir else self.path

    def items(self):
        """(shard, TensorInfo) in shard order, then data order."""
        for s in self.shards:
            for t in self.files[s]:
                yield s, t


PAUSE_ENV = "APRENDER_TEST_PAUSE_AFTER_SHARD"


def pause_hook_for_tests():
    """Test-only: with APRENDER_TEST_PAUSE_AFTER_SHARD=1 a writer given this hook stops after
    its first shard, says so on stderr and waits for a signal, so signal tests need no
    timing.  None otherwise."""
    if os.environ.get(PAUSE_ENV) != "1":
        return None

    def pause():
        print("aprender-test: paused", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.05)
    return pause


class CheckpointWriter:
    """Builds OUTPUT under a temporary name: shards tensor by tensor, then the other files,
    the index and config; :meth:`commit` renames it into place."""

    def __init__(self, ckpt, target, *, force, pause_hook=None, what="OUTPUT"):
        self.ckpt = ckpt
        self.target = target
        self.force = force
        self.what = what
        self.tmp = temp_name(target, "dir" if ckpt.is_dir else "file")
        self.weight_map = {}
        self.sizes = {}
        self.elements = {}
        self._pause = pause_hook

    def abort(self):
        remove_tree(self.tmp)

    def commit(self):
        commit_path(self.tmp, self.target, force=self.force, what=self.what)

    # -- shards ------------------------------------------------------------------------------
    def shard(self, shard, metadata, planned=None):
        """A ShardWriter for ``shard``; ``planned``: the output entries (name -> (dtype, shape,
        nbytes)) when known up front, so the header goes first and the file is preallocated;
        otherwise the data is spooled and the header written at the end."""
        if self.ckpt.is_dir:
            fd = create_new(self.tmp, shard)
        else:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        return ShardWriter(self, shard, fd, metadata, planned)

    def _done(self, shard, names, size, elements=0):
        for n in names:
            if n in self.weight_map:
                raise CheckpointError(f"tensor {short_repr(n)} would be written to both "
                                      f"{display(self.weight_map[n])} and {display(shard)}")
            self.weight_map[n] = shard
        self.sizes[shard] = size
        self.elements[shard] = elements
        if self._pause is not None:
            self._pause()

    # -- the rest of a folder ----------------------------------------------------------------
    def copy_others(self, rename=None):
        """Copy the folder's other files; ``rename`` maps a name to the output's name for it."""
        rename = rename or {}
        for name in self.ckpt.others:
            self._copy_file(name, rename.get(name, name))

    def _copy_file(self, name, out_name=None):
        """The bytes of the regular file behind ``name`` (a link's target) as a new file."""
        with open_regular(self.ckpt.real[name]) as f:
            fd = create_new(self.tmp, out_name or name, 0o666)
            try:
                copy_range(f, 0, os.fstat(f.fileno()).st_size, fd)
            finally:
                os.close(fd)

    def write_index(self, rebuild):
        """Copy the index (dense output) or write it for the new tensor names and sizes:
        ``total_size`` is the bytes and ``total_parameters`` the elements the output's tensors
        store (a compressed tensor counts what is stored, not its dense size)."""
        if self.ckpt.index is None:
            return
        if not rebuild:
            self._copy_file(INDEX_NAME)
            return
        index = dict(self.ckpt.index)
        meta = index.get("metadata")
        meta = dict(meta) if isinstance(meta, dict) else {}
        meta["total_size"] = sum(self.sizes.values())
        meta["total_parameters"] = sum(self.elements.values())
        index["metadata"] = meta
        index["weight_map"] = dict(sorted(self.weight_map.items()))
        self.write_json(INDEX_NAME, index)

    def write_json(self, name, value):
        self.write_text(name, json.dumps(value, indent=2) + "\n")

    def write_text(self, name, text):
        """Write (or replace) the file ``name`` of the output folder."""
        fd = create_new(self.tmp, name) if not os.path.lexists(os.path.join(self.tmp, name)) \
            else os.open(os.path.join(self.tmp, name),
                         os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def read_output_json(self, name):
        """A JSON file already copied into the output (config.json), or None if absent."""
        path = os.path.join(self.tmp, name)
        if not os.path.isfile(path) or os.path.islink(path):
            return None
        return read_json(path, display(os.path.join(self.ckpt.path, name)))


class ShardWriter:
    """One output safetensors file, written in a single pass: :meth:`copy` (an untouched
    tensor), :meth:`add` (new bytes), then :meth:`close`."""

    def __init__(self, owner, shard, fd, metadata, planned):
        self.owner, self.shard, self.fd = owner, shard, fd
        self.metadata = metadata
        self.entries = {}
        self.pos = 0
        self.elements = 0
        self.planned = planned
        if planned is not None:
            pos, entries = 0, {}
            for n, (d, shape, nb) in planned.items():
                entries[n] = {"dtype": d, "shape": list(shape), "data_offsets": [pos, pos + nb]}
                pos += nb
            header = encode_header(entries, metadata)
            _preallocate(fd, len(header) + pos, shard)
            write_all(fd, header)
            self.data_fd = fd
            self.spool = None
        else:
            self.spool = tempfile.TemporaryFile(dir=owner.tmp if owner.ckpt.is_dir
                                                else os.path.dirname(owner.tmp))
            self.data_fd = self.spool.fileno()

    def _entry(self, name, dtype, shape, nbytes):
        if name in self.entries:
            raise CheckpointError(f"{display(self.shard)}: two tensors named {short_repr(name)} "
                                  "in the output (an input tensor collides with a generated name)")
        if self.planned is not None:
            want = self.planned.get(name)
            if want is None or want[2] != nbytes:
                raise CheckpointError(f"{display(self.shard)}: tensor {short_repr(name)} does not "
                                      "match the planned header")
        self.entries[name] = {"dtype": dtype, "shape": list(shape),
                              "data_offsets": [self.pos, self.pos + nbytes]}
        self.pos += nbytes
        self.elements += math.prod(shape)

    def copy(self, sf, info, name=None):
        """Copy an input tensor's bytes unchanged (under ``name`` when given: a renamed
        tensor)."""
        self._entry(info.name if name is None else name, info.dtype, info.shape, info.nbytes)
        sf.copy_to(info.name, self.data_fd)

    def add(self, name, dtype, shape, chunks, nbytes):
        """Write a tensor given as an iterable of C-contiguous arrays (``nbytes`` in all)."""
        self._entry(name, dtype, shape, nbytes)
        done = 0
        for c in chunks:
            if c.nbytes:
                write_all(self.data_fd, np.ascontiguousarray(c).reshape(-1).view(np.uint8))
            done += c.nbytes
        if done != nbytes:
            raise CheckpointError(f"tensor {short_repr(name)}: wrote {done} bytes, expected "
                                  f"{nbytes}")

    def close(self):
        try:
            if self.spool is not None:
                write_all(self.fd, encode_header(self.entries, self.metadata))
                self.spool.seek(0)
                copy_range(self.spool, 0, self.pos, self.fd)
        finally:
            os.close(self.fd)
            if self.spool is not None:
                self.spool.close()
        self.owner._done(self.shard, list(self.entries), self.pos, self.elements)


def _preallocate(fd, size, shard):
    """Reserve the output's blocks up front: ext4 and xfs write a preallocated file several
    times faster, and a full disk fails here, before any data is written."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise CheckpointError(f"{display(shard)}: not enough space for {size} bytes") \
                from None
