"""`aprender prune` / `aprender inspect` on small checkpoints built here, read back with the
independent `safetensors` package."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
st_numpy = pytest.importorskip("safetensors.numpy")

from aprender._validation import prune_count  # noqa: E402
from aprender.cli import main  # noqa: E402
from aprender.io import SafetensorsFile, write_safetensors  # noqa: E402

BF16 = ml_dtypes.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTED = ["model.layers.0.attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.attn.q_proj.weight"]


def _weights(rng, shape, dtype):
    """Tie-free magnitudes (distinct |w| after rounding to dtype): a permutation of a grid."""
    n = int(np.prod(shape))
    mags = (np.arange(1, n + 1, dtype=np.float64) + rng.random()) / (n + 1)
    if dtype in (np.float16, BF16):
        # few distinct values fit 16 bits: draw from the exactly representable ones
        bits = np.arange(0x3000, 0x3000 + n, dtype=np.uint16)
        vals = bits.view(np.float16).astype(np.float32) if dtype == np.float16 else \
            (bits.astype(np.uint32) << 16).view(np.float32)
        mags = vals.astype(np.float64)
    vals = rng.permutation(mags) * rng.choice([-1.0, 1.0], n)
    return vals.reshape(shape).astype(dtype)


def make_tensors(rng, dtype=np.float32, mixed=False):
    dts = [dtype] * 3 if not mixed else [np.float32, np.float16, BF16]
    t = {
        "model.embed_tokens.weight": _weights(rng, (40, 16), dtype),
        SELECTED[0]: _weights(rng, (16, 16), dts[0]),
        SELECTED[1]: _weights(rng, (24, 16), dts[1]),
        SELECTED[2]: _weights(rng, (16, 32), dts[2]),
        "model.layers.0.input_layernorm.weight": np.ones(16, dtype),
        "model.layers.0.mlp.up_proj.bias": _weights(rng, (24,), dtype),
        "model.norm.weight": np.ones(16, dtype),
        "lm_head.weight": _weights(rng, (40, 16), dtype),
        "position_ids": np.arange(12, dtype=np.int64),
        "mask.bool": np.array([True, False, True]),
        "scale": np.array(2.0, dtype=np.float32),
    }
    return t


def save(path, tensors, metadata=None):
    st_numpy.save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def load(path):
    return st_numpy.load_file(str(path))


def run_cli(*args, check=None):
    """Subprocess through ``python -m aprender``."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "aprender", *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if check is not None:
        assert r.returncode == check, r.stderr
    return r


def mags(a):
    return np.abs(np.asarray(a, dtype=np.float64)).reshape(-1)


def assert_magnitude_mask(orig, out, k):
    """Exactly k zeros, and they are the k smallest |w| (tie-free data)."""
    o = mags(orig)
    pruned = np.asarray(out, np.float64).reshape(-1) == 0
    assert int(pruned.sum()) == k
    np.testing.assert_array_equal(np.asarray(out)[~pruned.reshape(out.shape)],
                                  np.asarray(orig)[~pruned.reshape(out.shape)])
    if 0 < k < o.size:
        assert o[pruned].max() < o[~pruned].min()


def listing(d):
    return sorted(os.listdir(d))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------
# prune: results
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_layer_unstructured_single_file(tmp_path, rng, dtype):
    src = tmp_path / "in.safetensors"
    tensors = make_tensors(rng, dtype)
    save(src, tensors, {"format": "pt", "note": "kept"})
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"
    rep = tmp_path / "report.json"
    r = run_cli("prune", src, "-o", out, "--sparsity", "0.3", "--report", rep, check=0)
    assert "tensor" in r.stdout and "kept/total" in r.stdout
    assert src.read_bytes() == before
    res = load(out)
    assert list(res) == list(load(src))
    for name, a in tensors.items():
        if name in SELECTED:
            assert res[name].dtype == a.dtype
            assert_magnitude_mask(a, res[name], prune_count(0.3, a.size))
        else:
            assert res[name].tobytes() == a.tobytes() and res[name].dtype == a.dtype, name
    meta = SafetensorsFile(out).metadata
    assert meta["note"] == "kept" and meta["format"] == "pt"
    info = json.loads(meta["aprender"])
    assert info["pattern"] == "unstructured" and info["sparsity"] == 0.3
    assert info["scope"] == "layer" and info["importance"] == "l1" and "selection" in info
    report = json.loads(rep.read_text())
    assert [t["name"] for t in report["tensors"]] == SELECTED
    assert all(t["kept"] == t["total"] - prune_count(0.3, t["total"]) for t in report["tensors"])
    assert "lm_head" in report["selection"]["rule"]
    assert listing(tmp_path) == ["in.safetensors", "out.safetensors", "report.json"]


def _global_reference(arrays, sparsity):
    allm = np.concatenate([mags(a) for a in arrays])
    k = prune_count(sparsity, allm.size)
    order = np.argsort(allm, kind="stable")
    pruned = np.zeros(allm.size, bool)
    pruned[order[:k]] = True
    out, pos = [], 0
    for a in arrays:
        out.append(pruned[pos:pos + a.size].reshape(a.shape))
        pos += a.size
    return out, k


@pytest.mark.parametrize("mixed", [False, True], ids=["f32", "mixed-dtypes"])
def test_global_scope_exact(tmp_path, rng, mixed):
    src = tmp_path / "in.safetensors"
    tensors = make_tensors(rng, np.float32, mixed=mixed)
    save(src, tensors)
    out = tmp_path / "out.safetensors"
    main(["prune", str(src), "-o", str(out), "--sparsity", "0.55", "--scope", "global", "--quiet",
          "--threads", "2"])
    res = load(out)
    # tensors are ranked in file (data) order, which is what SafetensorsFile lists
    order = [t.name for t in SafetensorsFile(src) if t.name in SELECTED]
    ref, k = _global_reference([tensors[n] for n in order], 0.55)
    got = [res[n].astype(np.float64) == 0 for n in order]
    assert sum(int(g.sum()) for g in got) == k
    for n, g, rf in zip(order, got, ref):
        np.testing.assert_array_equal(g, rf, err_msg=n)
    for name in tensors:
        if name not in SELECTED:
            assert res[name].tobytes() == tensors[name].tobytes()


def _make_sharded(tmp_path, rng, dtype=BF16):
    d = tmp_path / "ckpt"
    d.mkdir()
    t = make_tensors(rng, dtype)
    names = list(t)
    shards = {"model-00001-of-00002.safetensors": names[:5],
              "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for shard, ns in shards.items():
        save(d / shard, {n: t[n] for n in ns})
        weight_map.update({n: shard for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(a.nbytes for a in t.values())},
         "weight_map": weight_map}, indent=2))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return d, t, shards


def test_sharded_folder_global(tmp_path, rng):
    d, t, shards = _make_sharded(tmp_path, rng)
    out = tmp_path / "pruned"
    rep = tmp_path / "r.json"
    run_cli("prune", d, "-o", out, "--sparsity", "0.5", "--scope", "global", "--quiet",
            "--report", rep, check=0)
    assert listing(out) == listing(d)
    for f in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (out / f).read_bytes() == (d / f).read_bytes()
    res = {}
    for shard in shards:
        res.update(load(out / shard))
        assert "aprender" in SafetensorsFile(out / shard).metadata
    order = [ti.name for shard in shards for ti in SafetensorsFile(d / shard)
             if ti.name in SELECTED]
    ref, k = _global_reference([t[n] for n in order], 0.5)
    assert sum(int((res[n].astype(np.float32) == 0).sum()) for n in order) == k
    for n, rf in zip(order, ref):
        np.testing.assert_array_equal(res[n].astype(np.float32) == 0, rf)
    for n in t:
        if n not in SELECTED:
            assert res[n].tobytes() == t[n].tobytes()
    report = json.loads(rep.read_text())
    assert report["totals"]["pruned"] == k
    assert report["totals"]["selected_elements"] == sum(t[n].size for n in SELECTED)


def test_folder_without_index_and_per_row_pattern(tmp_path, rng):
    d = tmp_path / "ck"
    d.mkdir()
    t = make_tensors(rng, np.float16)
    names = list(t)
    save(d / "a.safetensors", {n: t[n] for n in names[:3]})
    save(d / "b.safetensors", {n: t[n] for n in names[3:]})
    (d / "README.md").write_text("hello")
    out = tmp_path / "o"
    assert main(["prune", str(d), "-o", str(out), "--pattern", "per-row", "--sparsity", "0.25",
                 "--quiet"]) == 0
    assert listing(out) == ["README.md", "a.safetensors", "b.safetensors"]
    res = {**load(out / "a.safetensors"), **load(out / "b.safetensors")}
    for n in SELECTED:
        rows = res[n].reshape(res[n].shape[0], -1)
        per_row = (rows == 0).sum(axis=1)
        assert (per_row == prune_count(0.25, rows.shape[1])).all()
        for orig_row, row in zip(t[n], rows):
            assert_magnitude_mask(orig_row, row, prune_count(0.25, rows.shape[1]))


def test_nm_2_4_and_inspect(tmp_path, rng, capsys):
    src = tmp_path / "in.safetensors"
    t = make_tensors(rng, BF16)
    save(src, t)
    out = tmp_path / "o.safetensors"
    run_cli("prune", src, "-o", out, "--pattern", "2:4", "--importance", "l2", check=0)
    res = load(out)
    for n in SELECTED:
        groups = res[n].astype(np.float32).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) == 2).all()
        og = mags(t[n]).reshape(-1, 4)
        kept = groups != 0
        assert (np.where(kept, og, np.inf).min(axis=1) > np.where(kept, -np.inf, og).max(axis=1)
                ).all()
    assert json.loads(SafetensorsFile(out).metadata["aprender"])["importance"] == "l2"
    r = run_cli("inspect", out, "--json", check=0)
    info = {x["name"]: x for x in json.loads(r.stdout)["tensors"]}
    for n in SELECTED:
        assert info[n]["pattern"] == "2:4" and info[n]["sparsity"] == 0.5
        assert info[n]["dtype"] == "BF16" and info[n]["pruned"]
    assert info["lm_head.weight"]["pattern"] == "dense" and info["lm_head.weight"]["zeros"] == 0
    assert not info["lm_head.weight"]["pruned"]
    assert info["position_ids"]["zeros"] == 1  # the 0 in arange
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2:4" in text and "pruned by aprender" in text


def test_max_tensor_sparsity_and_warning(tmp_path, rng):
    t = make_tensors(rng, np.float32)
    t[SELECTED[0]] = (t[SELECTED[0]] * 1e-3).astype(np.float32)  # globally the smallest
    src = tmp_path / "in.safetensors"
    save(src, t)
    rep = tmp_path / "r.json"
    total = sum(t[n].size for n in SELECTED)
    k = prune_count(0.4, total)
    r = run_cli("prune", src, "-o", tmp_path / "a.safetensors", "--sparsity", "0.4", "--scope",
                "global", "--report", rep, check=0)
    report = json.loads(rep.read_text())
    assert report["totals"]["pruned"] == k
    assert any(SELECTED[0] in w for w in report["warnings"])
    assert "warning" in r.stderr and "!" in r.stdout
    main(["prune", str(src), "-o", str(tmp_path / "b.safetensors"), "--sparsity", "0.4",
          "--scope", "global", "--max-tensor-sparsity", "0.7", "--report", str(rep), "--quiet",
          "--force"])  # an existing report is replaced only with --force
    report = json.loads(rep.read_text())
    assert report["totals"]["pruned"] == k and not report["warnings"]
    res = load(tmp_path / "b.safetensors")
    zeros = {n: int((res[n] == 0).sum()) for n in SELECTED}
    assert zeros[SELECTED[0]] == int(np.floor(0.7 * t[SELECTED[0]].size))
    assert sum(zeros.values()) == k
    # the others still prune their smallest values
    for n in SELECTED[1:]:
        o = mags(t[n])
        p = res[n].reshape(-1) == 0
        assert o[p].max() < o[~p].min()


def test_dry_run_include_exclude(tmp_path, rng):
    src = tmp_path / "in.safetensors"
    t = make_tensors(rng)
    save(src, t)
    rep = tmp_path / "r.json"
    # --include narrows the name rule only: the 1-D bias, the norm and lm_head stay out, and the
    # report says why
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
                 "--include", r"layers\.0\.", "--include", "lm_head", "--dry-run", "--report",
                 str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    assert [x["name"] for x in report["tensors"]] == SELECTED[:2]
    skipped = {x["name"]: x["reason"] for x in report["selection"]["skipped"]}
    assert "1-D" in skipped["model.layers.0.mlp.up_proj.bias"]
    assert "1-D" in skipped["model.layers.0.input_layernorm.weight"]
    assert "output head" in skipped["lm_head.weight"]
    # --no-default-exclude: whatever --include matches (floating, not a scalar), minus --exclude
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
                 "--include", r"layers\.0\.", "--include", "lm_head", "--exclude", "layernorm",
                 "--no-default-exclude", "--dry-run", "--report", str(rep), "--force",
                 "--quiet"]) == 0
    assert listing(tmp_path) == ["in.safetensors", "r.json"]
    report = json.loads(rep.read_text())
    names = [x["name"] for x in report["tensors"]]
    assert names == [n for n in (SafetensorsFile(src).tensors) if n in {
        SELECTED[0], SELECTED[1], "model.layers.0.mlp.up_proj.bias", "lm_head.weight"}]
    assert all(x["kept"] == x["total"] - prune_count(0.5, x["total"]) for x in report["tensors"])
    assert report["output"] is None and report["dry_run"]


def test_include_matching_only_excluded_tensors_says_why(tmp_path, rng, capsys):
    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng))
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
                 "--include", "norm"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no tensor matches the selection" in err and "--no-default-exclude" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("pattern,msg", [
    ("row", "--pattern row is not accepted here: use 'per-row'"),
    ("block:4x4", "--pattern 'block:4x4': expected 'unstructured', 'per-row' or N:M"),
    ("column", "--pattern 'column': expected"),
    ("nonsense", "--pattern 'nonsense': expected"),
])
def test_pattern_errors_list_what_prune_accepts(tmp_path, rng, capsys, pattern, msg):
    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng))
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
                 "--pattern", pattern]) == 2
    err = capsys.readouterr().err
    assert msg in err and "--sparsity" not in err.split("error:")[1].split(msg)[0]


def test_python_api_errors_name_python_arguments(tmp_path, rng):
    from aprender.checkpoints import prune_checkpoint
    from aprender.errors import PruningError

    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng))
    with pytest.raises(PruningError, match=r"importance='wanda' needs calibration=FILE") as info:
        prune_checkpoint(src, tmp_path / "o.safetensors", sparsity=0.5, importance="wanda")
    assert "--" not in str(info.value)
    with pytest.raises(PruningError, match=r"^pattern='row' is not accepted"):
        prune_checkpoint(src, tmp_path / "o.safetensors", sparsity=0.5, pattern="row")


def test_mistyped_option_and_command_suggest_the_right_one(capsys):
    assert_exit(["prune", "a", "-o", "b", "--sparsty", "0.5"], 2)
    assert "did you mean --sparsity?" in capsys.readouterr().err
    assert_exit(["prun", "a"], 2)
    assert "did you mean prune?" in capsys.readouterr().err


def test_bare_aprender_prints_usage_and_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for word in ("usage: aprender", "prune", "calibrate", "inspect", "densify"):
        assert word in err


def assert_exit(argv, code):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code


def test_force_replaces_output(tmp_path, rng):
    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng))
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert main(["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--quiet"]) == 1
    assert out.read_bytes() == b"old"
    assert main(["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--quiet",
                 "--force"]) == 0
    assert len(load(out)) == len(make_tensors(rng))
    assert listing(tmp_path) == ["in.safetensors", "o.safetensors"]


def test_sparse24_bitmask_folder(tmp_path, rng):
    sparse24 = pytest.importorskip("aprender.sparse24")
    d, t, shards = _make_sharded(tmp_path, rng)
    out = tmp_path / "o"
    assert main(["prune", str(d), "-o", str(out), "--pattern", "2:4", "--format",
                 "sparse-24-bitmask", "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    # what compressed-tensors 0.14 writes for a sparse-only model: no "format" key (it made
    # ModelCompressor parse a quantization config and reject it)
    assert set(qc) == {"quant_method", "sparsity_config", "transform_config", "version"}
    assert sc["targets"] == sorted(n[:-len(".weight")] for n in SELECTED)
    everything = sum(a.size for a in t.values())
    pruned = sum(t[n].size // 2 for n in SELECTED)
    assert sc["global_sparsity"] == pruned / everything  # the whole model's fraction
    index = json.loads((out / "model.safetensors.index.json").read_text())
    res = {}
    for shard in shards:
        res.update(load(out / shard))
    assert set(index["weight_map"]) == set(res)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in res.values())
    assert index["metadata"]["total_parameters"] == sum(a.size for a in res.values())
    for n in SELECTED:
        p = n[:-len(".weight")]
        assert n not in res
        assert res[p + ".compressed"].dtype == BF16
        tensors = {k: (v.view(np.uint16) if v.dtype == BF16 else v)
                   for k, v in res.items() if k.startswith(p + ".")}
        dense = sparse24.Sparse24Tensor.from_tensors(tensors, p).to_dense()
        dense = np.asarray(getattr(dense, "bits", dense)).view(np.uint16).view(BF16)
        groups = dense.astype(np.float32).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) == 2).all()
        np.testing.assert_array_equal(np.where(groups != 0, groups, 0),
                                      np.where(groups != 0, t[n].astype(np.float32).reshape(-1, 4),
                                               0))
    for n in t:
        if n not in SELECTED:
            assert res[n].tobytes() == t[n].tobytes()


def test_help_mentions_default_selection():
    r = run_cli("prune", "--help", check=0)
    text = " ".join(r.stdout.split())
    assert "embeddings" in text and "lm_head" in text and "norm" in text


# ----------------------------------------------------------------------------------------------
# errors: one line, exit code, nothing partial left
# ----------------------------------------------------------------------------------------------

def _err_case(tmp_path, rng, case):
    src = tmp_path / "in.safetensors"
    t = make_tensors(rng)
    save(src, t)
    out = tmp_path / "o.safetensors"
    args = ["prune", str(src), "-o", str(out), "--sparsity", "0.5"]
    if case == "same":
        args[3] = str(src)
    elif case == "missing":
        args[1] = str(tmp_path / "nope.safetensors")
    elif case == "truncated":
        data = src.read_bytes()
        src.write_bytes(data[:-10])
    elif case == "corrupt":
        data = bytearray(src.read_bytes())
        data[8:12] = b"#!@x"
        src.write_bytes(bytes(data))
    elif case == "tiny":
        src.write_bytes(b"\x01\x02")
    elif case == "no-folder":
        args[3] = str(tmp_path / "missing-dir" / "o.safetensors")
    elif case == "shape":
        t2 = dict(t)
        t2["model.layers.9.odd.weight"] = _weights(rng, (4, 6), np.float32)
        save(src, t2)
        args = ["prune", str(src), "-o", str(out), "--pattern", "2:4"]
    elif case == "nothing":
        args += ["--include", "does-not-exist"]
    elif case in ("2-4", "5:4", "0:4"):
        args = ["prune", str(src), "-o", str(out), "--pattern", case]
    elif case == "format":
        args += ["--format", "csr"]
    elif case == "regex":
        args += ["--include", "("]
    elif case == "global-nm":
        args = ["prune", str(src), "-o", str(out), "--pattern", "2:4", "--scope", "global"]
    elif case == "no-sparsity":
        args = args[:4]
    elif case == "bad-sparsity":
        args[5] = "1.5"
    elif case == "nan":
        t2 = dict(t)
        t2[SELECTED[1]] = t2[SELECTED[1]].copy()
        t2[SELECTED[1]][3, 5] = np.nan
        save(src, t2)
        args += ["--scope", "global"]
    elif case in ("nan-global-0", "nan-global-1"):  # nothing to select, NaN still refused
        t2 = dict(t)
        t2[SELECTED[1]] = t2[SELECTED[1]].copy()
        t2[SELECTED[1]][3, 5] = np.nan
        save(src, t2)
        args[5] = "0" if case.endswith("0") else "1"
        args += ["--scope", "global"]
    elif case == "nan-layer":
        t2 = dict(t)
        t2[SELECTED[2]] = t2[SELECTED[2]].copy()
        t2[SELECTED[2]][1, 1] = np.inf
        save(src, t2)
    return args


ERRORS = {"same": 2, "missing": 1, "truncated": 1, "corrupt": 1, "tiny": 1, "no-folder": 1,
          "shape": 1, "nothing": 1, "2-4": 2, "5:4": 2, "0:4": 2, "format": 2, "regex": 2,
          "global-nm": 2, "no-sparsity": 2, "bad-sparsity": 2, "nan": 1, "nan-layer": 1,
          "nan-global-0": 1, "nan-global-1": 1}
MESSAGE = {"same": "same as INPUT", "missing": "nope.safetensors", "truncated": "truncated",
           "corrupt": "corrupt", "no-folder": "missing-dir", "shape": "model.layers.9.odd.weight",
           "nothing": "no tensor matches", "2-4": "2-4", "5:4": "5:4", "0:4": "0:4",
           "format": "csr", "nan": SELECTED[1], "nan-layer": SELECTED[2],
           "nan-global-0": SELECTED[1], "nan-global-1": SELECTED[1]}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(tmp_path, rng, capsys, case):
    args = _err_case(tmp_path, rng, case)
    before = {p: (tmp_path / p).read_bytes() for p in listing(tmp_path)}
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == ERRORS[case]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert case not in MESSAGE or MESSAGE[case] in err, err
    assert {p: (tmp_path / p).read_bytes() for p in listing(tmp_path)} == before


def test_error_exit_codes_subprocess(tmp_path, rng):
    args = _err_case(tmp_path, rng, "5:4")
    r = run_cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    args = _err_case(tmp_path, rng, "truncated")
    r = run_cli(*args)
    assert r.returncode == 1 and "in.safetensors" in r.stderr
    assert listing(tmp_path) == ["in.safetensors"]


def test_unwritable_folder(tmp_path, rng, capsys):
    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng))
    before = src.read_bytes()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root ignores permission bits: use a folder no one can create files in
        if not os.path.isdir("/proc/self"):
            pytest.fail("no read-only folder available to test an unwritable output")
        target = os.path.join("/proc", "aprender-test-out.safetensors")
        assert main(["prune", str(src), "-o", target, "--sparsity", "0.5"]) == 1
        assert not os.path.exists(target)
        assert "aprender-test-out" in capsys.readouterr().err
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["prune", str(src), "-o", str(ro / "o.safetensors"), "--sparsity",
                         "0.5"]) == 1
            assert listing(ro) == []
        finally:
            ro.chmod(0o755)
    assert src.read_bytes() == before
    assert listing(tmp_path) == ["in.safetensors"]


def test_reader_matches_safetensors(tmp_path, rng):
    t = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
         "f16": rng.standard_normal(7).astype(np.float16),
         "bf16": rng.standard_normal((2, 4)).astype(BF16),
         "f64": rng.standard_normal(2), "i8": np.arange(5, dtype=np.int8),
         "b": np.array([True, False]), "empty": np.zeros((0, 4), np.float32),
         "scalar": np.array(3.5, np.float32)}
    save(tmp_path / "a.safetensors", t)
    f = SafetensorsFile(tmp_path / "a.safetensors")
    for n, a in t.items():
        got = f.array(n)
        if n == "bf16":
            assert got.format == "bfloat16"
            np.testing.assert_array_equal(got.bits, a.view(np.uint16))
        else:
            assert got.dtype == a.dtype and got.shape == a.shape
            np.testing.assert_array_equal(got, a)
    # and our writer produces files safetensors reads
    from aprender import Bits16

    write_safetensors(tmp_path / "b.safetensors",
                      {"x": Bits16(t["bf16"].view(np.uint16), "bfloat16"), "y": t["f32"],
                       "e": t["empty"]}, metadata={"k": "v"})
    back = load(tmp_path / "b.safetensors")
    assert back["x"].dtype == BF16 and back["x"].tobytes() == t["bf16"].tobytes()
    np.testing.assert_array_equal(back["y"], t["f32"])
    assert back["e"].shape == (0, 4)


def test_import_does_not_load_torch():
    code = ("import sys, aprender, aprender.cli, aprender.io; "
            "assert 'torch' not in sys.modules and 'tqdm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_prune_checkpoint_api_matches_the_command_line(tmp_path, rng):
    from aprender.checkpoints import prune_checkpoint
    from aprender.errors import CheckpointError, InvalidArgumentError, UnsafePathError

    src = tmp_path / "in.safetensors"
    save(src, make_tensors(rng, np.float16))
    assert main(["prune", str(src), "-o", str(tmp_path / "cli.safetensors"), "--sparsity", "0.5",
                 "--scope", "global", "--quiet"]) == 0
    seen = []
    report = prune_checkpoint(src, tmp_path / "api.safetensors", sparsity=0.5, scope="global",
                              progress=lambda n, total: seen.append((n, total)))
    assert (tmp_path / "api.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    assert report["totals"]["sparsity"] == 0.5 and sum(n for n, _ in seen) == seen[0][1]
    with pytest.raises(InvalidArgumentError):
        prune_checkpoint(src, tmp_path / "x", sparsity=0.5, scope="global", pattern="2:4")
    with pytest.raises(UnsafePathError):
        prune_checkpoint(src, src, sparsity=0.5, force=True)
    with pytest.raises(CheckpointError):
        prune_checkpoint(tmp_path / "missing", tmp_path / "y", sparsity=0.5)


def test_write_safetensors_keeps_scalars_0d(tmp_path):
    write_safetensors(tmp_path / "s.safetensors", {"a": np.array(3.5, np.float32),
                                                   "b": np.zeros((2, 0), np.float16)})
    f = SafetensorsFile(tmp_path / "s.safetensors")
    assert f.tensors["a"].shape == () and f.tensors["b"].shape == (2, 0)
    assert load(tmp_path / "s.safetensors")["a"].shape == ()
