"""The catalogue of hostile compressed checkpoints (aprender ``bitmask``, compressed-tensors
``sparse-24-bitmask``): every reader (``inspect --check``, ``densify``, ``prune``,
``load_dense``, ``aprender.torch.load_state_dict``) refuses the same files the same way, with a
CompressedFormatError naming the tensor, and never hands out a file or array another reader
refuses."""
import json
import struct

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")

from aprender.cli import main  # noqa: E402
from aprender.errors import CheckpointError, CompressedFormatError  # noqa: E402
from aprender.inspect import inspect_checkpoint  # noqa: E402
from aprender.io import write_safetensors  # noqa: E402
from aprender.io.formats import load_dense  # noqa: E402
from catalogue import cli  # noqa: E402

BITMASK_META = {"aprender": json.dumps({"format": "bitmask"})}


def _raw_safetensors(path, entries, data, metadata=None):
    """A safetensors file from header entries (name -> (dtype, shape, bytes)) written as they
    are: shapes nothing in numpy could build."""
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    assert len(data) == pos
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _all_readers_refuse(path, capsys, tmp_path, match):
    """inspect --check, densify, prune, load_dense and load_state_dict: the same typed error."""
    out = tmp_path / "densified"
    for args in (["inspect", path, "--check"], ["densify", path, "-o", out, "--quiet"],
                 ["prune", path, "-o", tmp_path / "pruned", "--sparsity", "0.5", "--quiet"]):
        code, err = cli(args, capsys)
        assert code == 1 and match in err, (args[0], err)
    with pytest.raises(CompressedFormatError, match=match):
        load_dense(path)
    with pytest.raises(CompressedFormatError, match=match):
        inspect_checkpoint(path, check=True)
    pytest.importorskip("torch")
    from aprender.torch import load_state_dict

    with pytest.raises(CompressedFormatError, match=match):
        load_state_dict(path)
    assert not out.exists() and not (tmp_path / "pruned").exists()


# ----------------------------------------------------------------------------------------------
# float8 tensors load in their stored dtype, bit for bit as the safetensors package loads them
# ----------------------------------------------------------------------------------------------

def test_load_state_dict_returns_float8_in_its_stored_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    from aprender.torch import load_state_dict

    g = torch.Generator().manual_seed(0)
    src = {"e4m3": (torch.randn(5, 8, generator=g) * 30).to(torch.float8_e4m3fn),
           "e5m2": (torch.randn(7, generator=g) * 1e4).to(torch.float8_e5m2),
           "empty": torch.zeros(0, 3).to(torch.float8_e4m3fn),
           "u8": torch.arange(6, dtype=torch.uint8)}
    path = tmp_path / "f8.safetensors"
    safetensors.torch.save_file(src, str(path))
    ref = safetensors.torch.load_file(str(path))
    got = load_state_dict(path)
    assert list(got) == list(ref)
    for name, r in ref.items():
        assert got[name].dtype == r.dtype and got[name].shape == r.shape, name
        assert torch.equal(got[name].view(torch.uint8), r.view(torch.uint8)), name
    assert got["e4m3"].dtype == torch.float8_e4m3fn and got["e5m2"].dtype == torch.float8_e5m2


# ----------------------------------------------------------------------------------------------
# a group's dense shape that numpy could not hold (a 0 beside 2**61, products that overflow) or
# that disagrees with its parts is a CompressedFormatError naming the group, never a file our own
# inspect (or the safetensors package) refuses, never numpy's untyped "array is too big"
# ----------------------------------------------------------------------------------------------

def _bitmask_group(path, dims, values_dtype="F32", shape_dtype="I64"):
    """A bitmask group W with no values and the dense shape ``dims`` (an empty mask when a
    dimension is 0)."""
    n = 1
    for d in dims:
        n *= d
    mask_len = -(-n // 8) if n < 1 << 40 else 1
    fmt = {"I64": "<q", "U64": "<Q"}[shape_dtype]
    shape_bytes = b"".join(struct.pack(fmt, d) for d in dims)
    _raw_safetensors(path, {"W.values": (values_dtype, [0], 0), "W.mask": ("U8", [mask_len],
                                                                           mask_len),
                            "W.shape": (shape_dtype, [len(dims)], len(shape_bytes))},
                     b"\0" * mask_len + shape_bytes, BITMASK_META)


@pytest.mark.parametrize("dims,dtype", [([0, 2 ** 61], "F32"), ([2 ** 61, 0], "F32"),
                                        ([0, 2 ** 62], "F16"), ([0, 2 ** 63], "U8"),
                                        ([0, 2 ** 40, 2 ** 40], "F32"),
                                        ([2 ** 32, 2 ** 32], "F32"),
                                        ([0, 2 ** 64 - 1], "F32")])
def test_bitmask_group_with_a_shape_numpy_cannot_hold_is_refused(tmp_path, capsys, dims,
                                                                    dtype):
    path = tmp_path / "g.safetensors"
    _bitmask_group(path, dims, dtype, "U64" if max(dims) >= 2 ** 63 else "I64")
    _all_readers_refuse(path, capsys, tmp_path, "'W.shape'")


def test_sparse24_group_with_a_shape_numpy_cannot_hold_is_refused(tmp_path, capsys):
    path = tmp_path / "g.safetensors"
    shape_bytes = struct.pack("<qq", 0, 2 ** 61)
    _raw_safetensors(path, {"p.shape": ("I64", [2], 16), "p.compressed": ("F32", [0, 2 ** 60], 0),
                            "p.bitmask": ("U8", [0, 2 ** 58], 0)}, shape_bytes)
    _all_readers_refuse(path, capsys, tmp_path, "'p.shape'")


def test_a_group_with_a_zero_and_a_large_dimension_that_fits_reads_back(tmp_path, capsys):
    """The rule is numpy's (and the safetensors format's): [0, 2**40] float32 is a valid empty
    tensor, and densify writes a file that inspect and the safetensors package read."""
    path = tmp_path / "g.safetensors"
    _bitmask_group(path, [0, 2 ** 40], "F32")
    assert load_dense(path)["W"].shape == (0, 2 ** 40)
    out = tmp_path / "dense.safetensors"
    assert cli(["densify", path, "-o", out, "--quiet"], capsys)[0] == 0
    assert inspect_checkpoint(out)["tensors"][0]["shape"] == [0, 2 ** 40]
    import safetensors.numpy

    assert safetensors.numpy.load_file(str(out))["W"].shape == (0, 2 ** 40)


# ----------------------------------------------------------------------------------------------
# one rule for all readers: a logical name appears once in a checkpoint, and a group's parts
# live in one shard
# ----------------------------------------------------------------------------------------------

def _sp24_parts(prefix="p"):
    from aprender.sparse24 import compress

    w = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    return compress(w, layout="bitmask", select=True).to_tensors(prefix)


def _bm_parts(name="w"):
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], bool)
    vals = np.arange(1, 10, dtype=np.float32)
    return {name + ".values": vals[keep], name + ".mask": np.packbits(keep, bitorder="little"),
            name + ".shape": np.asarray([3, 3], np.int64)}


def _case(tmp_path, case):
    """(path, text the errors share)."""
    d = tmp_path / "ck"
    d.mkdir()
    plain = np.ones((4, 8), np.float32)
    if case == "sp24-group-and-plain":
        write_safetensors(d / "model.safetensors", {"p.weight": plain, **_sp24_parts()})
        return d / "model.safetensors", "'p.weight' appears twice"
    if case == "bitmask-group-and-plain":
        write_safetensors(d / "model.safetensors", {**_bm_parts(), "w": np.ones(9, np.float32)},
                          BITMASK_META)
        return d / "model.safetensors", "'w' appears twice"
    if case == "group-and-plain-in-two-shards":
        write_safetensors(d / "a.safetensors", _sp24_parts())
        write_safetensors(d / "b.safetensors", {"p.weight": plain})
        return d, "'p.weight' appears twice"
    if case == "plain-in-two-shards":
        write_safetensors(d / "a.safetensors", {"x.weight": plain})
        write_safetensors(d / "b.safetensors", {"x.weight": plain})
        return d, "'x.weight' appears twice"
    if case == "sp24-parts-split":
        parts = _sp24_parts()
        write_safetensors(d / "a.safetensors", {"p.shape": parts["p.shape"],
                                                "p.compressed": parts["p.compressed"]})
        write_safetensors(d / "b.safetensors", {"p.bitmask": parts["p.bitmask"]})
        return d, "split across shards"
    if case == "bitmask-parts-split":
        parts = _bm_parts()
        write_safetensors(d / "a.safetensors", {"w.values": parts["w.values"],
                                                "w.mask": parts["w.mask"]}, BITMASK_META)
        write_safetensors(d / "b.safetensors", {"w.shape": parts["w.shape"]}, BITMASK_META)
        return d, "split across shards"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["sp24-group-and-plain", "bitmask-group-and-plain",
                                  "group-and-plain-in-two-shards", "plain-in-two-shards",
                                  "sp24-parts-split", "bitmask-parts-split"])
def test_name_collisions_are_refused_alike_by_every_reader(tmp_path, capsys, case):
    path, match = _case(tmp_path, case)
    _all_readers_refuse(path, capsys, tmp_path, match)


def test_a_complete_group_in_each_shard_is_fine(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    write_safetensors(d / "a.safetensors", _sp24_parts("p"))
    write_safetensors(d / "b.safetensors", _sp24_parts("q"))
    got = load_dense(d)
    assert sorted(got) == ["p.weight", "q.weight"]
    np.testing.assert_array_equal(got["p.weight"], got["q.weight"])
    assert inspect_checkpoint(d, check=True)["totals"]["tensors"] == 2
    assert issubclass(CompressedFormatError, CheckpointError)
