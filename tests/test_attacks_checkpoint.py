"""The catalogue of hostile checkpoints and paths: every attack reproduced against the command
line and the checkpoint reader, each kept fixed by a test.

Each case asserts the outcome (a one-line error and its exit code, or the correct result), that
every input is byte-for-byte unchanged and that nothing was written anywhere but OUTPUT.
"""
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")
import safetensors.numpy  # noqa: E402,F401

from aprender.cli import main  # noqa: E402
from aprender.errors import CheckpointError, PruningError, UnsafePathError  # noqa: E402
from aprender.io import SafetensorsFile, write_safetensors  # noqa: E402
from aprender.io.checkpoint import Checkpoint  # noqa: E402
from catalogue import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = "model.safetensors.index.json"


def tensors(seed=0, names=("model.layers.0.q.weight", "model.layers.0.k.weight")):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((8, 16)).astype(np.float32) for n in names}


def snapshot(*roots):
    """{path: bytes or link target or kind} of everything under the roots (links not
    followed), to prove that nothing changed."""
    out = {}
    for root in roots:
        root = str(root)
        if not os.path.lexists(root):
            out[root] = None
            continue
        paths = [root]
        for d, dirs, files in os.walk(root):
            paths += [os.path.join(d, n) for n in dirs + files]
        for p in paths:
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[p] = f.read()
            elif os.path.isdir(p):
                out[p] = "dir"
            else:
                out[p] = "special"
    return out


def sharded(folder, shard_names, seed=0):
    """A checkpoint folder with one tensor per shard name and an index naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, s in enumerate(shard_names):
        name = f"model.layers.{i}.q.weight"
        weight_map[name] = s
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return weight_map


def write_shard(path, seed=0, name="model.layers.0.q.weight"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, tensors(seed, (name,)))


# ----------------------------------------------------------------------------------------------
# 1. shard names from the index never leave the checkpoint; nothing is written outside OUTPUT
# ----------------------------------------------------------------------------------------------

def test_absolute_shard_name_is_refused_and_the_target_untouched(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere" / "important.safetensors"
    write_shard(str(elsewhere), seed=7)
    ck = tmp_path / "ck"
    sharded(ck, [str(elsewhere)])
    before = snapshot(tmp_path)
    code, err = cli(["prune", ck, "-o", tmp_path / "out", "--sparsity", "0.5"], capsys)
    assert code == 1 and "not a plain relative path" in err
    assert snapshot(tmp_path) == before


def test_dotdot_shard_name_is_refused(tmp_path, capsys):
    write_shard(str(tmp_path / "x" / "model.safetensors"))
    ck = tmp_path / "ck"
    sharded(ck, ["../x/model.safetensors"])
    before = snapshot(tmp_path)
    code, err = cli(["prune", ck, "-o", tmp_path / "out", "--sparsity", "0.5"], capsys)
    assert code == 1 and "../x/model.safetensors" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", [5, None, ["a.safetensors"], {"a": 1}, True, ""])
def test_non_string_index_values_are_an_error(tmp_path, capsys, value):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_shard(str(ck / "a.safetensors"))
    (ck / INDEX).write_text(json.dumps({"weight_map": {"model.layers.0.q.weight": value}}))
    before = snapshot(tmp_path)
    code, err = cli(["prune", ck, "-o", tmp_path / "out", "--sparsity", "0.5"], capsys)
    assert code == 1 and INDEX in err
    assert snapshot(tmp_path) == before


def test_shard_in_a_subfolder_is_mirrored(tmp_path, capsys):
    ck = tmp_path / "ck"
    sharded(ck, ["sub/model-1.safetensors", "model-2.safetensors"])
    write_shard(str(ck / "sub" / "model-1.safetensors"), 1, "model.layers.0.q.weight")
    write_shard(str(ck / "model-2.safetensors"), 2, "model.layers.1.q.weight")
    before = snapshot(ck)
    out = tmp_path / "out"
    code, err = cli(["prune", ck, "-o", out, "--sparsity", "0.5", "--quiet"], capsys)
    assert code == 0, err
    assert snapshot(ck) == before
    got = safetensors.numpy.load_file(str(out / "sub" / "model-1.safetensors"))
    w = got["model.layers.0.q.weight"]
    assert int((w == 0).sum()) == w.size // 2
    assert (out / INDEX).read_bytes() == (ck / INDEX).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ck", "out"]


# ----------------------------------------------------------------------------------------------
# 2. --force never deletes an input, and never replaces a special file
# ----------------------------------------------------------------------------------------------

def _folder_ck(tmp_path):
    ck = tmp_path / "parent" / "ck"
    ck.mkdir(parents=True)
    write_safetensors(ck / "model.safetensors", tensors())
    (ck / "config.json").write_text("{}")
    (tmp_path / "parent" / "sibling.txt").write_text("keep me")
    return ck


@pytest.mark.parametrize("which", ["input-folder", "ancestor", "the-file", "inside"])
def test_force_never_replaces_or_holds_the_input(tmp_path, capsys, which):
    ck = _folder_ck(tmp_path)
    src, out = {"input-folder": (ck / "model.safetensors", ck),
                "ancestor": (ck, tmp_path / "parent"),
                "the-file": (ck / "model.safetensors", ck / "model.safetensors"),
                "inside": (ck, ck / "pruned")}[which]
    before = snapshot(tmp_path)
    code, err = cli(["prune", src, "-o", out, "--sparsity", "0.5", "--force"], capsys)
    assert code == 2, err
    assert snapshot(tmp_path) == before


def test_force_through_a_symlinked_output_that_resolves_to_an_ancestor(tmp_path, capsys):
    ck = _folder_ck(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "parent")
    before = snapshot(tmp_path)
    code, _ = cli(["prune", ck, "-o", link, "--sparsity", "0.5", "--force"], capsys)
    assert code == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_force_never_replaces_a_special_file(tmp_path, capsys, kind):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    out = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(out)
        sock = None
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
    try:
        before = snapshot(tmp_path)
        code, err = cli(["prune", src, "-o", out, "--sparsity", "0.5", "--force"], capsys)
        assert code == 2 and ("FIFO" in err or "socket" in err), err
        assert snapshot(tmp_path) == before
    finally:
        if sock is not None:
            sock.close()


def test_force_replaces_an_ordinary_previous_output(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert cli(["prune", src, "-o", out, "--sparsity", "0.5", "--quiet", "--force"],
               capsys)[0] == 0
    assert SafetensorsFile(out).tensors.keys() == tensors().keys()


# ----------------------------------------------------------------------------------------------
# 3. --report obeys the OUTPUT rules, before any work
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["input", "input-dry-run", "output", "inside-output",
                                  "fifo", "unwritable", "exists", "inside-input"])
def test_report_path_is_checked_before_any_work(tmp_path, capsys, case):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_safetensors(ck / "model.safetensors", tensors())
    out = tmp_path / "out"
    report = {"input": ck / "model.safetensors", "input-dry-run": ck / "model.safetensors",
              "output": out, "inside-output": out / "r.json",
              "fifo": tmp_path / "fifo", "unwritable": tmp_path / "no" / "such" / "r.json",
              "exists": tmp_path / "old.json", "inside-input": ck / "r.json"}[case]
    if case == "fifo":
        os.mkfifo(report)
    if case == "exists":
        report.write_text("previous")
    args = ["prune", ck, "-o", out, "--sparsity", "0.5", "--report", report, "--quiet"]
    if case == "input-dry-run":
        args.append("--dry-run")
    if case == "fifo":
        args.append("--force")
    before = snapshot(tmp_path)
    code, err = cli(args, capsys)
    assert code in (1, 2), err
    assert "--report" in err
    assert snapshot(tmp_path) == before  # in particular OUTPUT was not written


def test_report_replaces_an_existing_report_with_force(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    rep = tmp_path / "r.json"
    rep.write_text("old")
    assert cli(["prune", src, "-o", tmp_path / "o.safetensors", "--sparsity", "0.5",
                "--report", rep, "--force", "--quiet"], capsys)[0] == 0
    assert json.loads(rep.read_text())["totals"]["selected_tensors"] == 2


# ----------------------------------------------------------------------------------------------
# 4. symbolic links and special files
# ----------------------------------------------------------------------------------------------

def _hf_cache(tmp_path):
    """models--org--name/{blobs, snapshots/<rev>} with relative links, as the hub cache does."""
    repo = tmp_path / "hub" / "models--org--name"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / "0123abcd"
    (snap / "tokenizer").mkdir(parents=True)
    blobs.mkdir()
    write_safetensors(blobs / "aaa", tensors())
    (blobs / "bbb").write_text('{"model_type": "llama"}')
    (blobs / "ccc").write_text('{"vocab": {}}')
    (snap / "model.safetensors").symlink_to("../../blobs/aaa")
    (snap / "config.json").symlink_to("../../blobs/bbb")
    (snap / "tokenizer" / "tokenizer.json").symlink_to("../../../blobs/ccc")
    return repo, snap


def test_hugging_face_cache_layout_gives_a_self_contained_output(tmp_path, capsys):
    repo, snap = _hf_cache(tmp_path)
    before = snapshot(repo)
    out = tmp_path / "out"
    code, err = cli(["prune", snap, "-o", out, "--sparsity", "0.5", "--quiet"], capsys)
    assert code == 0, err
    assert snapshot(repo) == before
    for rel, blob in [("config.json", "bbb"), ("tokenizer/tokenizer.json", "ccc")]:
        p = out / rel
        assert not os.path.islink(p) and p.read_bytes() == (repo / "blobs" / blob).read_bytes()
    assert not os.path.islink(out / "model.safetensors")
    got = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert all(int((w == 0).sum()) == w.size // 2 for w in got.values())


@pytest.mark.parametrize("case", ["folder-outside", "dev-zero", "file-outside", "dangling",
                                  "fifo-inside", "link-to-folder-inside"])
def test_links_that_leave_the_checkpoint_and_special_files_are_refused(tmp_path, capsys, case):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_safetensors(ck / "model.safetensors", tensors())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    if case == "folder-outside":
        (ck / "extra").symlink_to(outside)
    elif case == "dev-zero":
        (ck / "zeros.bin").symlink_to(os.devnull.replace("null", "zero"))
    elif case == "file-outside":
        (ck / "notes.txt").symlink_to(outside / "secret.txt")
    elif case == "dangling":
        (ck / "gone.txt").symlink_to(ck / "nowhere")
    elif case == "fifo-inside":
        os.mkfifo(ck / "pipe")
    else:
        (ck / "sub").mkdir()
        (ck / "again").symlink_to(ck / "sub")
    before = snapshot(tmp_path)
    code, err = cli(["prune", ck, "-o", tmp_path / "out", "--sparsity", "0.5"], capsys)
    assert code == 1, err
    assert snapshot(tmp_path) == before


def test_link_to_a_regular_file_inside_is_copied_as_a_file(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_safetensors(ck / "model.safetensors", tensors())
    (ck / "a.txt").write_text("hello")
    (ck / "b.txt").symlink_to("a.txt")
    assert cli(["prune", ck, "-o", tmp_path / "out", "--sparsity", "0.5", "--quiet"],
               capsys)[0] == 0
    assert not os.path.islink(tmp_path / "out" / "b.txt")
    assert (tmp_path / "out" / "b.txt").read_text() == "hello"


def _run_bounded(args, timeout=120):
    """A CLI run in a subprocess that may not block: a hang fails the test instead of the
    suite."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "aprender", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_fifo_as_input_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    args = [command, fifo] + (["-o", tmp_path / "o", "--sparsity", "0.5"]
                              if command == "prune" else [])
    r = _run_bounded(args)
    assert r.returncode == 1 and "FIFO" in r.stderr, r.stderr


def test_terminal_as_input_is_refused_without_blocking(tmp_path):
    master, slave = pty.openpty()
    try:
        r = _run_bounded(["inspect", os.ttyname(slave)])
        assert r.returncode == 1 and "character device" in r.stderr, r.stderr
    finally:
        os.close(master)
        os.close(slave)


def test_symlink_input_to_dev_zero_is_refused(tmp_path, capsys):
    link = tmp_path / "model.safetensors"
    link.symlink_to(os.devnull.replace("null", "zero"))
    code, err = cli(["inspect", link], capsys)
    assert code == 1 and "character device" in err


# ----------------------------------------------------------------------------------------------
# 5. name collisions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".shape", ".bitmask", ".compressed"])
def test_bitmask_names_colliding_with_existing_tensors_are_an_error(tmp_path, capsys, suffix):
    rng = np.random.default_rng(0)
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {"layer.weight": rng.standard_normal((8, 16)).astype(np.float16),
                            "layer" + suffix: np.zeros(3, np.int64)})
    before = snapshot(tmp_path)
    code, err = cli(["prune", src, "-o", tmp_path / "o.safetensors", "--pattern", "2:4",
                     "--format", "sparse-24-bitmask"], capsys)
    assert code == 1 and "layer" + suffix in err
    assert snapshot(tmp_path) == before


def test_shard_named_like_a_spool_file_is_not_clobbered(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    rng = np.random.default_rng(1)
    a = {"a.weight": rng.standard_normal((8, 16)).astype(np.float16)}
    b = {"b.weight": rng.standard_normal((8, 16)).astype(np.float16)}
    write_safetensors(ck / "a.safetensors", a)
    write_safetensors(ck / "a.safetensors.data", b)
    (ck / INDEX).write_text(json.dumps({"weight_map": {"a.weight": "a.safetensors",
                                                       "b.weight": "a.safetensors.data"}}))
    before = snapshot(ck)
    out = tmp_path / "out"
    code, err = cli(["prune", ck, "-o", out, "--pattern", "2:4", "--format",
                     "sparse-24-bitmask", "--quiet"], capsys)
    assert code == 0, err
    assert snapshot(ck) == before
    # a folder without config.json gets one holding the sparsity config loaders need
    assert sorted(os.listdir(out)) == ["a.safetensors", "a.safetensors.data", "config.json",
                                       INDEX]
    assert list(json.loads((out / "config.json").read_text())) == ["quantization_config"]
    assert "b.compressed" in SafetensorsFile(out / "a.safetensors.data").tensors


# ----------------------------------------------------------------------------------------------
# headers and index files: as strict as the format, one-line errors, bounded memory
# ----------------------------------------------------------------------------------------------

def raw_file(header, data=b"", pad=True):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "float-offset": raw_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', bytes(8)),
    "float-dim": raw_file(b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', bytes(8)),
    "bool-dim": raw_file({"a": entry(shape=(True, 2))}, bytes(8)),
    "string-dim": raw_file({"a": entry(shape=("2",))}, bytes(8)),
    "string-offset": raw_file({"a": entry(offsets=("0", 8))}, bytes(8)),
    "1e400": raw_file(b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,8]}}', bytes(8)),
    "Infinity": raw_file(b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}',
                         bytes(8)),
    "NaN": raw_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,NaN]}}', bytes(8)),
    "huge-int": raw_file(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000
                         + b'],"data_offsets":[0,8]}}', bytes(8)),
    "list-dtype": raw_file({"a": entry(dtype=["F32"])}, bytes(8)),
    "unknown-dtype": raw_file({"a": entry(dtype="F33")}, bytes(8)),
    "lowercase-dtype": raw_file({"a": entry(dtype="f32")}, bytes(8)),
    "duplicate-name": raw_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                               b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "metadata-int": raw_file({"__metadata__": {"k": 1}, "a": entry()}, bytes(8)),
    "metadata-list": raw_file({"__metadata__": ["k"], "a": entry()}, bytes(8)),
    "metadata-nested": raw_file({"__metadata__": {"k": {"x": "y"}}, "a": entry()}, bytes(8)),
    "header-too-long": struct.pack("<Q", 100_000_001) + b"{" + bytes(100),
    "gap": raw_file({"a": entry(offsets=(8, 16))}, bytes(16)),
    "overlap": raw_file({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)),
    "trailing-bytes": raw_file({"a": entry()}, bytes(9)),
    "truncated": raw_file({"a": entry()}, bytes(7)),
    "size-mismatch": raw_file({"a": entry(shape=(3,))}, bytes(8)),
    "numpy-cannot-index": raw_file({"a": entry(shape=(0, 2 ** 62))}),
    "65-dims": raw_file({"a": entry(shape=(1,) * 65, offsets=(0, 4))}, bytes(4)),
    "lone-surrogate-name": raw_file(b'{"\\ud800":{"dtype":"F32","shape":[2],'
                                    b'"data_offsets":[0,8]}}', bytes(8)),
    "deep-nesting": raw_file(b"[" * 100_000 + b"]" * 100_000),
    "metadata-flood": raw_file(("{\"__metadata__\":{" + ",".join(f'"{i:x}":"v"' for i in range(5000))
                                + "}}").encode()),
    "entry-not-object": raw_file({"a": [1, 2]}, bytes(8)),
    "missing-key": raw_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "three-offsets": raw_file({"a": entry(offsets=(0, 4, 8))}, bytes(8)),
    "negative-offset": raw_file({"a": entry(offsets=(-8, 0))}, bytes(8)),
    "not-utf8": raw_file(b'{"\xff":{}}'),
    "not-an-object": raw_file(b"[]"),
    "json-file": b'{"model_type": "llama", "hidden_size": 4096, "x": "' + b"y" * 100 + b'"}',
    "empty": b"",
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_are_checkpoint_errors(tmp_path, capsys, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_HEADERS[case])
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert isinstance(info.value, PruningError) and isinstance(info.value, ValueError)
    assert "bad.safetensors" in str(info.value)
    before = snapshot(tmp_path)
    code, err = cli(["prune", path, "-o", tmp_path / "o.safetensors", "--sparsity", "0.5"],
                    capsys)
    assert code == 1, err
    code, err = cli(["inspect", path], capsys)
    assert code == 1, err
    assert snapshot(tmp_path) == before


def test_the_reference_implementation_agrees_on_the_structural_cases(tmp_path):
    """Where the format itself forbids a header, the safetensors package refuses it too."""
    for case in ("float-offset", "float-dim", "bool-dim", "string-dim", "unknown-dtype",
                 "lowercase-dtype", "metadata-int", "gap", "trailing-bytes", "truncated",
                 "size-mismatch", "negative-offset"):
        with pytest.raises(Exception):
            safetensors.deserialize(BAD_HEADERS[case])


def test_json_file_is_reported_as_not_safetensors(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(BAD_HEADERS["json-file"])
    code, err = cli(["inspect", path], capsys)
    assert code == 1 and "not a safetensors file" in err


@pytest.mark.parametrize("case", ["deep", "duplicate", "infinity", "huge-int", "not-utf8"])
@pytest.mark.parametrize("where", [INDEX, "config.json"])
def test_bad_index_and_config_documents(tmp_path, capsys, case, where):
    ck = tmp_path / "ck"
    ck.mkdir()
    rng = np.random.default_rng(0)
    write_safetensors(ck / "model.safetensors",
                      {"l.weight": rng.standard_normal((8, 16)).astype(np.float16)})
    good = {"weight_map": {"l.weight": "model.safetensors"}}
    bad = {"deep": b"[" * 100_000 + b"]" * 100_000,
           "duplicate": b'{"weight_map": {}, "weight_map": {}}',
           "infinity": b'{"weight_map": {}, "x": Infinity}',
           "huge-int": b'{"weight_map": {}, "x": ' + b"1" * 5000 + b"}",
           "not-utf8": b'{"\xff": 1}'}[case]
    (ck / INDEX).write_bytes(bad if where == INDEX else json.dumps(good).encode())
    if where == "config.json":
        (ck / "config.json").write_bytes(bad)
    before = snapshot(tmp_path)
    code, err = cli(["prune", ck, "-o", tmp_path / "out", "--pattern", "2:4", "--format",
                     "sparse-24-bitmask"], capsys)
    assert code == 1 and where in err, err
    assert snapshot(tmp_path) == before


def test_huge_pattern_integer_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    code, err = cli(["prune", src, "-o", tmp_path / "o", "--pattern", "2:" + "9" * 5000],
                    capsys)
    assert code == 2


def test_giant_shape_list_is_refused_before_it_is_built(tmp_path):
    """A 20 MB header holding one ten-million-element shape: refused by the pre-scan, with
    memory bounded by the header bytes themselves."""
    header = b'{"a":{"dtype":"U8","shape":[' + b"1," * 9_999_999 + b'1],"data_offsets":[0,1]}}'
    path = tmp_path / "big.safetensors"
    path.write_bytes(raw_file(header, b"\x00"))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="longer than 64"):
            SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * len(header), peak


def test_many_tensor_header_parses_with_memory_proportional_to_it(tmp_path):
    """A legitimate 20 MB header (about 200,000 empty tensors) costs a few times its size, not
    twenty (the first version took about 450 MB)."""
    entries = ",".join(f'"model.layers.{i}.mlp.weight":{{"dtype":"F32","shape":[0,4],'
                       f'"data_offsets":[0,0]}}' for i in range(250_000))
    header = ("{" + entries + "}").encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(raw_file(header))
    tracemalloc.start()
    try:
        f = SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(f) == 250_000
    assert peak < 10 * len(header), (peak, len(header))


# ----------------------------------------------------------------------------------------------
# printing untrusted names; command-line odds and ends
# ----------------------------------------------------------------------------------------------

def test_control_characters_in_names_are_escaped(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    rng = np.random.default_rng(0)
    evil = "x\x1b[2J\x07\u202e.weight"
    write_safetensors(src, {evil: rng.standard_normal((8, 16)).astype(np.float32)},
                      metadata={"aprender": "\x1b]0;title\x07"})
    assert cli(["inspect", src], capsys)[0] == 0
    out = capsys.readouterr()
    code = main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out
    code = main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5"])
    out = capsys.readouterr().out
    assert code == 0 and "\x1b" not in out and "\\x1b[2J" in out


def test_threads_beyond_the_limit_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    code, err = cli(["prune", src, "-o", tmp_path / "o", "--sparsity", "0.5", "--threads",
                     "99999"], capsys)
    assert code == 2 and "99999" in err


@pytest.mark.parametrize("output", ["", "newdir/"])
def test_messages_never_name_temporary_paths(tmp_path, capsys, output, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_safetensors(tmp_path / "in.safetensors", tensors())
    before = snapshot(tmp_path)
    code, err = cli(["prune", "in.safetensors", "-o", output, "--sparsity", "0.5"], capsys)
    assert code == 2 and "OUTPUT" in err
    assert snapshot(tmp_path) == before


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors(names=[f"t{i}.weight" for i in range(3000)]))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "aprender", "inspect", str(src)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    p.stdout.readline()
    p.stdout.close()  # the reader goes away, as `| head -1` does
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    p.stderr.close()
    assert err == "" and p.returncode == 141, err


# ----------------------------------------------------------------------------------------------
# signals: the writer pauses at a known point (test-only switch), so nothing depends on timing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("fmt", ["dense", "sparse-24-bitmask"])
def test_signal_mid_write_leaves_nothing(tmp_path, sig, code, fmt):
    d = tmp_path / "ck"
    d.mkdir()
    for s in range(2):
        write_safetensors(d / f"s{s}.safetensors",
                          {f"l{s}.{i}.weight": np.ones((8, 16), np.float16) for i in range(3)})
    before = snapshot(d)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               APRENDER_TEST_PAUSE_AFTER_SHARD="1")
    p = subprocess.Popen([sys.executable, "-m", "aprender", "prune", str(d), "-o",
                          str(tmp_path / "out"), "--pattern", "2:4", "--format", fmt, "--quiet"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    line = p.stderr.readline()  # blocks until the writer has paused after its first shard
    assert line.strip() == "aprender-test: paused", line
    assert any(n.endswith(".aprender-tmp") for n in os.listdir(tmp_path))
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert snapshot(d) == before


def test_unsafe_path_error_is_a_checkpoint_error():
    assert issubclass(UnsafePathError, CheckpointError)
    with pytest.raises(CheckpointError):
        Checkpoint("/nonexistent/aprender/checkpoint")


# ----------------------------------------------------------------------------------------------
# fuzz: mutated headers and index files give a CheckpointError or a correct result
# ----------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

_VALID = {"a.weight": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 16]},
          "b": {"dtype": "I64", "shape": [3], "data_offsets": [16, 40]},
          "c": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [40, 40]},
          "__metadata__": {"format": "pt"}}
_DATA = bytes(range(40))
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
                     | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def _mutate_header(data):
    header = json.loads(json.dumps(_VALID))
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(header) + ["new"]))
        if name == "__metadata__" or name not in header or data.draw(st.booleans()):
            header[name] = data.draw(_JSON)
        else:
            key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            e = header[name] if isinstance(header[name], dict) else {}
            e[key] = data.draw(_JSON | st.sampled_from(["F32", "U8", "F16", "BF16"])
                               | st.lists(st.integers(-2, 64), max_size=3))
            header[name] = e
    return json.dumps(header).encode()


def _check_against_reference(path, raw):
    """Our reader accepted the file: the reference implementation must accept it too and hand
    out the same tensors, byte for byte."""
    ours = SafetensorsFile(path)
    ref = {n: v for n, v in safetensors.deserialize(raw)}
    assert sorted(ref) == sorted(t.name for t in ours)
    for t in ours:
        assert ref[t.name]["dtype"] == t.dtype and list(ref[t.name]["shape"]) == list(t.shape)
        assert bytes(ref[t.name]["data"]) == ours.words(t.name).tobytes()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_headers(tmp_path, data):
    if data.draw(st.booleans()):
        header = _mutate_header(data)
        extra = data.draw(st.sampled_from([b"", b"\x00" * 8]))
        raw = struct.pack("<Q", len(header)) + header + _DATA[:data.draw(st.integers(0, 40))] \
            + extra
    else:  # byte-level damage to a valid file
        raw = bytearray(raw_file(_VALID, _DATA))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    try:
        SafetensorsFile(path)
    except CheckpointError:
        return
    _check_against_reference(path, raw)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.one_of(_JSON, st.fixed_dictionaries(
    {"weight_map": st.dictionaries(st.sampled_from(["l.weight", "m", "x"]),
                                   _JSON | st.sampled_from(["model.safetensors", "../model.safetensors",
                                                            "/model.safetensors", "sub/../x",
                                                            "model.safetensors/"]),
                                   max_size=3)})))
def test_fuzz_index_files(tmp_path, index):
    ck = tmp_path / "ck"
    ck.mkdir(exist_ok=True)
    write_safetensors(ck / "model.safetensors", {"l.weight": np.ones((2, 4), np.float32)})
    (ck / INDEX).write_text(json.dumps(index))
    try:
        c = Checkpoint(ck)
    except CheckpointError:
        return
    real_root = os.path.realpath(ck)
    for s in c.shards:
        assert os.path.realpath(c.shard_path(s)).startswith(real_root + os.sep)
    for name, s in c.index["weight_map"].items():
        assert name in c.files[s]


# ----------------------------------------------------------------------------------------------
# fuzz: compressed tensor groups (aprender bitmask, sparse-24-bitmask) from hostile files give a
# CompressedFormatError (a CheckpointError) or exactly the dense tensor the parts describe
# ----------------------------------------------------------------------------------------------

def _reference_dense(keep_bits, values, shape, n, cols=None):
    """Values placed at the set bits in C order (bits packed per row of ``cols`` for 2:4)."""
    if cols is not None:
        keep = np.unpackbits(keep_bits, axis=-1, count=cols, bitorder="little").reshape(-1)
    else:
        keep = np.unpackbits(keep_bits.reshape(-1), bitorder="little")[:n]
    keep = keep.astype(bool)
    out = np.zeros(n, values.dtype)
    out[keep] = values.reshape(-1)
    return out.reshape(shape)


def _valid_group(data, sp24):
    """Consistent parts of a random tensor (a mask for bitmask, a 2:4 selection for
    sparse-24-bitmask), to be damaged by the caller."""
    rows = data.draw(st.integers(1 if sp24 else 0, 3))
    cols = data.draw(st.integers(1, 3)) * 4 if sp24 else data.draw(st.integers(1, 9))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    r = np.random.default_rng(seed)
    w = (r.standard_normal((rows, cols)) + 3).astype(np.float32)
    if sp24:
        from aprender.sparse24 import compress

        return compress(w, layout="bitmask", select=True).to_tensors("p")
    keep = r.random(w.size) < 0.5
    return {"w.values": w.reshape(-1)[keep], "w.mask": np.packbits(keep, bitorder="little"),
            "w.shape": np.asarray(w.shape, np.int64)}


def _damage(data, tensors):
    names = sorted(tensors)
    for _ in range(data.draw(st.integers(0, 2))):
        name = data.draw(st.sampled_from(names))
        a = tensors[name]
        how = data.draw(st.sampled_from(["drop-last", "add", "flip-byte", "retype", "reshape"]))
        if how == "drop-last" and a.size:
            a = a.reshape(-1)[:-1] if a.ndim == 1 else a[:-1]
        elif how == "add":
            a = np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]) if a.size else \
                np.zeros(1, a.dtype)
        elif how == "flip-byte" and a.size:
            b = a.copy().reshape(-1).view(np.uint8)
            b[data.draw(st.integers(0, b.size - 1))] ^= data.draw(st.integers(1, 255))
            a = b.view(a.dtype).reshape(a.shape)
        elif how == "retype":
            a = a.astype(data.draw(st.sampled_from([np.int32, np.float32, np.uint8])))
        elif how == "reshape":
            a = a.reshape(-1)
        tensors[name] = a
    return tensors


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_compressed_groups(tmp_path, data):
    from aprender.errors import CompressedFormatError
    from aprender.io.formats import load_dense

    sp24 = data.draw(st.booleans())
    tensors = _damage(data, _valid_group(data, sp24))
    meta = {"format": "pt"} if sp24 else {"aprender": json.dumps({"format": "bitmask"})}
    path = tmp_path / "g.safetensors"
    write_safetensors(path, tensors, meta)
    try:
        got = load_dense(path)
    except CompressedFormatError:
        event("refused")
        return
    event("decoded sparse-24-bitmask" if sp24 else "decoded bitmask")
    if sp24:
        dense = got["p.weight"]
        shape = tuple(int(x) for x in tensors["p.shape"].reshape(-1))
        ref = _reference_dense(tensors["p.bitmask"], tensors["p.compressed"], shape,
                               int(np.prod(shape)), shape[-1])
    else:
        dense = got["w"]
        shape = tuple(int(x) for x in tensors["w.shape"])
        ref = _reference_dense(tensors["w.mask"], tensors["w.values"], shape, int(np.prod(shape)))
    assert dense.shape == shape and dense.dtype == ref.dtype
    assert dense.tobytes() == ref.tobytes()


_DIMS = st.sampled_from([0, 1, 2, 3, 4, 8, 9, 12, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 58, 2 ** 60,
                         2 ** 61, 2 ** 62, 2 ** 63 - 1])
_HEADER_SHAPES = st.sampled_from([[0, 2 ** 61], [2 ** 61, 0], [0, 2 ** 62, 2 ** 62], [0], [],
                                  [1], [2 ** 63], [0, 0]])


def _mutate_group_header(data, raw):
    """A safetensors file's bytes with one entry's shape (or dtype) replaced in the header, data
    offsets kept: shapes that only a hostile writer makes."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    e = header[name]
    how = data.draw(st.sampled_from(["reshape", "hostile-shape", "dtype"]))
    count = 1
    for d in e["shape"]:
        count *= d
    if how == "reshape":  # same element count, other dimensions
        e["shape"] = data.draw(st.sampled_from([[count], [1, count], [count, 1], [count, 1, 1]]))
    elif how == "hostile-shape":
        e["shape"] = data.draw(_HEADER_SHAPES)
    else:
        e["dtype"] = data.draw(st.sampled_from(["U8", "I8", "F16", "BF16", "F32", "I64", "U64",
                                                "F8_E4M3", "BOOL"]))
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + raw[8 + n:]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_compressed_shapes_headers_and_names(tmp_path, data):
    """Mutated dense shapes (zeros beside huge dimensions, overflowing products), header shapes
    and dtypes of the parts, the format tag and colliding names: every reader gives a
    CheckpointError, and all of them the same, or the right tensors; a densified file is read
    back alike by our reader and the safetensors package."""
    import safetensors.numpy

    from aprender.inspect import inspect_checkpoint
    from aprender.io.formats import load_dense

    sp24 = data.draw(st.booleans())
    tensors = _valid_group(data, sp24)
    shape_name = "p.shape" if sp24 else "w.shape"
    if data.draw(st.booleans()):
        dims = data.draw(st.lists(_DIMS, min_size=0, max_size=3))
        tensors[shape_name] = np.asarray(dims, np.uint64 if any(d >= 2 ** 63 for d in dims)
                                         else np.int64)
    if data.draw(st.booleans()):  # a plain tensor whose name collides with a group or a part
        name = data.draw(st.sampled_from(["p.weight", "w", "p", "w.values2", "x"]))
        tensors[name] = np.ones(data.draw(st.integers(0, 4)), np.float32)
    packed = not sp24 or data.draw(st.booleans())
    meta = {"aprender": json.dumps({"format": "bitmask"})} if packed else {"format": "pt"}
    path = tmp_path / "g.safetensors"
    write_safetensors(path, tensors, meta)
    mutated = data.draw(st.booleans())
    if mutated:
        path.write_bytes(_mutate_group_header(data, path.read_bytes()))
    out = tmp_path / "dense.safetensors"
    if out.exists():
        out.unlink()
    outcomes = []
    for read in (lambda: load_dense(path), lambda: inspect_checkpoint(path, check=True),
                 lambda: main(["densify", str(path), "-o", str(out), "--quiet"]) or "ok"):
        try:
            outcomes.append(read())
        except CheckpointError:
            outcomes.append(None)
    outcomes[2] = outcomes[2] if outcomes[2] == "ok" else None  # exit code 1: refused
    if outcomes[0] is None:
        event("refused")
        assert outcomes[1] is None and outcomes[2] is None and not out.exists(), outcomes
        return
    event("read")
    got = outcomes[0]
    assert outcomes[1] is not None and outcomes[2] == "ok", outcomes
    assert [r["name"] for r in outcomes[1]["tensors"]] == list(got)
    group = "p.weight" if sp24 else "w"
    if group in got and shape_name not in got and not mutated:  # the group decoded: check it
        shape = tuple(int(x) for x in np.asarray(tensors[shape_name]).reshape(-1))
        n = int(np.prod(shape, dtype=object))
        if sp24:
            ref = _reference_dense(tensors["p.bitmask"], tensors["p.compressed"], shape, n,
                                   shape[-1])
        else:
            ref = _reference_dense(tensors["w.mask"], tensors["w.values"], shape, n)
        dense = got[group]
        assert dense.shape == shape
        assert np.asarray(getattr(dense, "bits", dense)).tobytes() == \
            np.asarray(getattr(ref, "bits", ref)).tobytes()
    ours = SafetensorsFile(out)
    ref_file = safetensors.deserialize(out.read_bytes())
    assert [n for n, _ in ref_file] == [t.name for t in ours] or \
        sorted(n for n, _ in ref_file) == sorted(t.name for t in ours)
    for name, v in ref_file:
        t = ours.tensors[name]
        assert list(v["shape"]) == list(t.shape) and v["dtype"] == t.dtype
        assert bytes(v["data"]) == ours.words(name).tobytes()
    if all(t.dtype in ("F32", "F16", "I64", "U8", "I32") for t in ours):
        assert sorted(safetensors.numpy.load_file(str(out))) == sorted(got)


# -- a shard changed between reading its header and reading its data -------------------------

def _two_shards(tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    a = np.arange(1, 64 * 64 + 1, dtype=np.float32).reshape(64, 64)
    write_safetensors(src / "a.safetensors", {"x.weight": a})
    write_safetensors(src / "b.safetensors", {"y.weight": a.copy()})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x.weight": "a.safetensors",
                                         "y.weight": "b.safetensors"}}))
    outside = tmp_path / "outside.safetensors"
    write_safetensors(outside, {"x.weight": -a})  # same size, same header length
    return src, outside


@pytest.mark.parametrize("swap", ["symlink", "rewrite", "replace"])
def test_a_shard_swapped_mid_run_is_refused(tmp_path, monkeypatch, swap):
    """Symlinks are checked when the folder is read; a shard swapped for a link (or replaced, or
    rewritten in place with the same size) afterwards must not be read against the old header:
    every open compares device, inode, modification time and size."""
    from aprender import checkpoints

    src, outside = _two_shards(tmp_path)
    target = src / "a.safetensors"
    real = checkpoints.CheckpointPruner._write_shard

    def swapping(self, writer, shard):
        if shard == "a.safetensors" and not getattr(self, "_swapped", False):
            self._swapped = True
            if swap == "symlink":
                os.unlink(target)
                os.symlink(outside, target)
            elif swap == "rewrite":
                data = outside.read_bytes()
                with open(target, "r+b") as f:
                    f.write(data)
                os.utime(target, ns=(1, 1))  # even with a changed time stamp
            else:
                os.replace(outside, target)
        return real(self, writer, shard)

    monkeypatch.setattr(checkpoints.CheckpointPruner, "_write_shard", swapping)
    with pytest.raises(CheckpointError, match="since its header was read"):
        checkpoints.prune_checkpoint(src, tmp_path / "out", sparsity=0.5)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) in (["ck", "outside.safetensors"], ["ck"])


def test_children_see_sigint_whatever_launched_the_suite():
    """The signal tests above need a child that dies of SIGINT; started from a background job the
    suite inherits SIGINT ignored (conftest section 4 restores it), so check what a child sees."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


# ----------------------------------------------------------------------------------------------
# OUTPUT (or the config file, or --report) that appears while a run is in progress is never
# replaced without --force: the run pauses just before its final rename (test-only switch), the
# test puts the intruder there, the run resumes and must refuse, leave the intruder untouched
# and remove its own temporary output
# ----------------------------------------------------------------------------------------------

def _paused_run(tmp_path, args, pause_at, intrude):
    """Run ``aprender ARGS`` in a child that pauses before committing ``pause_at``; call
    ``intrude()`` there, resume; (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               APRENDER_TEST_PAUSE_BEFORE_COMMIT=str(pause_at))
    p = subprocess.Popen([sys.executable, "-m", "aprender"] + [str(a) for a in args], env=env,
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # blocks until the run has paused before that rename
    assert line.strip() == "aprender-test: commit paused", line + p.stderr.read()
    intrude()
    _, err = p.communicate("\n", timeout=120)
    return p.returncode, err


def _intruder(path, kind):
    if kind == "file":
        path.write_bytes(b"not yours")
    elif kind == "folder":
        path.mkdir()
        (path / "precious.txt").write_text("not yours")
    else:
        path.mkdir()


def _compressed_ck(tmp_path, folder):
    """A bitmask checkpoint (file or folder) for densify, made by prune."""
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", tensors())
    (src / "config.json").write_text("{}")
    out = tmp_path / ("bm" if folder else "bm.safetensors")
    assert main(["prune", str(src if folder else src / "model.safetensors"), "-o", str(out),
                 "--sparsity", "0.5", "--format", "bitmask", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("kind", ["file", "folder", "empty-folder"])
@pytest.mark.parametrize("writer", ["prune-folder", "prune-file", "densify-folder",
                                    "densify-file", "sidecar-config", "report"])
def test_output_appearing_during_the_run_is_never_replaced(tmp_path, writer, kind):
    if writer.startswith("densify"):
        src = _compressed_ck(tmp_path, writer == "densify-folder")
        out = tmp_path / ("dense" if writer == "densify-folder" else "dense.safetensors")
        args, target = ["densify", src, "-o", out, "--quiet"], out
    else:
        ck = tmp_path / "ck"
        ck.mkdir()
        write_safetensors(ck / "model.safetensors", tensors())
        (ck / "config.json").write_text("{}")
        folder = writer == "prune-folder"
        src = ck if folder else ck / "model.safetensors"
        out = tmp_path / ("out" if folder else "out.safetensors")
        args = ["prune", src, "-o", out, "--quiet", "--pattern", "2:4"]
        target = out
        if writer == "sidecar-config":
            args += ["--format", "sparse-24-bitmask"]
            target = tmp_path / "out.config.json"
        if writer == "report":
            target = tmp_path / "report.json"
            args += ["--report", target]
    before = snapshot(src)
    code, err = _paused_run(tmp_path, args, target, lambda: _intruder(target, kind))
    assert code == 1, err
    assert "appeared while the run was in progress" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(src) == before
    if kind == "file":
        assert target.read_bytes() == b"not yours"
    else:
        assert sorted(os.listdir(target)) == (["precious.txt"] if kind == "folder" else [])
    left = sorted(os.listdir(tmp_path))
    assert not any(n.endswith(".aprender-tmp") for n in left), left
    if writer == "sidecar-config":  # no output without its config
        assert not out.exists(), left


def test_output_appearing_during_a_forced_run_is_replaced(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_safetensors(ck / "model.safetensors", tensors())
    out = tmp_path / "out"
    code, err = _paused_run(tmp_path, ["prune", ck, "-o", out, "--quiet", "--sparsity", "0.5",
                                       "--force"], out, lambda: _intruder(out, "folder"))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["model.safetensors"]


@pytest.mark.parametrize("kind", ["file", "folder", "empty-folder"])
@pytest.mark.parametrize("ours", ["file", "folder"])
@pytest.mark.parametrize("mechanism", ["renameat2", "fallback", "fallback-no-links"])
def test_commit_never_replaces_what_appeared(tmp_path, monkeypatch, ours, kind, mechanism):
    """The commit itself, with renameat2 and with the fallback (link + unlink for a file, a
    claimed empty folder for a folder) that other platforms and filesystems get, and on a
    filesystem without hard links."""
    import errno

    from aprender.io import files

    if mechanism == "renameat2" and files._renameat2 is None:
        pytest.skip("renameat2 is not available here")
    if mechanism.startswith("fallback"):
        monkeypatch.setattr(files, "_renameat2", None)
    if mechanism == "fallback-no-links":
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(files.os, "link", no_link)
    target = tmp_path / "target"
    tmp = files.temp_name(str(target), "dir" if ours == "folder" else "file")
    if ours == "folder":
        with open(os.path.join(tmp, "mine"), "w") as f:
            f.write("mine")
    # nothing there: the commit succeeds
    files.commit_path(tmp, str(target), force=False)
    assert sorted(os.listdir(tmp_path)) == ["target"]
    files.remove_tree(str(target))
    tmp = files.temp_name(str(target), "dir" if ours == "folder" else "file")
    _intruder(target, kind)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="appeared while the run"):
        files.commit_path(tmp, str(target), force=False)
    assert snapshot(target) == before
    assert os.path.lexists(tmp)  # the caller removes it


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_calibration_file_appearing_while_it_is_saved_is_never_replaced(tmp_path, monkeypatch,
                                                                         kind):
    """``aprender calibrate`` saves without --force through CalibrationContext.save(force=False):
    a file or folder that appears at -o while the statistics are written is left alone."""
    from aprender.io import files
    from aprender.pruning import ActivationStats, CalibrationContext

    stats = ActivationStats(4)
    stats.update(np.ones((3, 4), np.float32))
    ctx = CalibrationContext({"l": stats})
    target = tmp_path / "calib.safetensors"
    monkeypatch.setattr(files, "_test_pause_before_commit", lambda t: _intruder(target, kind))
    with pytest.raises(CheckpointError, match="appeared while the run"):
        ctx.save(target, force=False)
    before = snapshot(target)
    assert before[str(target)] == (b"not yours" if kind == "file" else "dir")
    assert sorted(os.listdir(tmp_path)) == ["calib.safetensors"]
    with pytest.raises(CheckpointError, match="already exists|is a folder"):
        ctx.save(target, force=False)
    assert snapshot(target) == before


@pytest.mark.parametrize("where", ["header", "index", "compressed"])
def test_hostile_long_tensor_names_are_shortened_in_messages(tmp_path, capsys, where):
    long = "x" * 5000
    ck = tmp_path / "ck"
    ck.mkdir()
    if where == "header":
        (ck / "model.safetensors").write_bytes(raw_file({long: entry(dtype="NOPE")}, b"\0" * 8))
    elif where == "index":
        write_shard(str(ck / "model.safetensors"))
        (ck / INDEX).write_text(json.dumps({"weight_map": {long: "model.safetensors"}}))
    else:
        keep = np.array([1, 0, 1], bool)
        write_safetensors(ck / "model.safetensors",
                          {long + ".values": np.ones(1, np.float32),
                           long + ".mask": np.packbits(keep, bitorder="little"),
                           long + ".shape": np.asarray([3], np.int64)},
                          {"aprender": json.dumps({"format": "bitmask"})})
    code, err = cli(["inspect", ck], capsys)
    assert code == 1 and "xxxx" in err and len(err) < 600, (code, len(err))


def test_special_file_appearing_during_a_forced_run_is_never_replaced(tmp_path):
    """--force replaces a regular file or folder, never a FIFO, even one that appears while
    the run is in progress."""
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors())
    out = tmp_path / "out.safetensors"
    code, err = _paused_run(tmp_path, ["prune", src, "-o", out, "--quiet", "--sparsity", "0.5",
                                       "--force"], out, lambda: os.mkfifo(out))
    assert code == 2 and "FIFO" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out.safetensors"]
    assert not os.path.isfile(out)
