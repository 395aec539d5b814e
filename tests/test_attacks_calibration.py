"""The catalogue of hostile calibration files and calibration objects: every attack reproduced
once and kept fixed (memory bombs in sparse files, absurd sizes, hostile layer names, values a
float cannot hold, OWL with patterns it cannot honour), and a structure-aware fuzz of the
calibration-file reader.

Memory checks run in a child process whose address space is limited (RLIMIT_AS): reading or
mapping a Hessian of terabytes fails there at once instead of filling the machine, so a
regression fails the test quickly and harmlessly.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from aprender.errors import (CalibrationError, CalibrationFileError, CheckpointError,
                             InsufficientMemoryError, InvalidArgumentError, PruningError)
from aprender.io import write_safetensors
from aprender.io.safetensors import encode_header
from aprender.pruning.calibration import (CALIBRATION_FORMAT, ActivationStats,
                                          CalibrationContext, HessianFile)
from catalogue import check_error, cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE_D = 1 << 20  # a float32 Hessian of HUGE_D x HUGE_D is 4 TiB
LONG = "L" * 5000  # a hostile layer name


def sparse_calibration(path, d=HUGE_D, layer="l", hessian_dtype="F32", extra=None):
    """A valid calibration file whose layer ``layer`` has ``d`` input features and a Hessian
    of d x d: the sums of squares are written, the Hessian is a hole (a sparse file)."""
    hsize = d * d * (4 if hessian_dtype == "F32" else 8)
    entries = {f"{layer}.sum_squares": {"dtype": "F64", "shape": [d],
                                        "data_offsets": [0, 8 * d]},
               f"{layer}.count": {"dtype": "I64", "shape": [],
                                  "data_offsets": [8 * d, 8 * d + 8]},
               f"{layer}.hessian": {"dtype": hessian_dtype, "shape": [d, d],
                                    "data_offsets": [8 * d + 8, 8 * d + 8 + hsize]}}
    head = encode_header(entries, {"format": CALIBRATION_FORMAT, "num_samples": "1",
                                   **(extra or {})})
    with open(path, "wb") as f:
        f.write(head)
        f.write(np.ones(d, np.float64).tobytes())
        f.write(np.int64(1).tobytes())
        f.truncate(len(head) + 8 * d + 8 + hsize)
    return path


def wide_checkpoint(path, d=HUGE_D, layer="l", rows=2):
    rng = np.random.default_rng(0)
    write_safetensors(path, {f"{layer}.weight": rng.standard_normal((rows, d)).astype(np.float32)})
    return path


def run_limited(code, limit=16 << 30, timeout=300):
    """Run ``code`` in a child Python whose address space is limited to ``limit`` bytes; the
    child prints one JSON line as its result.  Returns (returncode, result or None, stderr)."""
    prologue = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
        def rss_kib():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        def peak_kib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr


# ----------------------------------------------------------------------------------------------
# memory bombs: a 4 TiB sparse-file Hessian
# ----------------------------------------------------------------------------------------------

def test_wanda_never_reads_a_4tib_hessian(tmp_path):
    """prune_checkpoint with Wanda (per-row and OWL), and the torch interop with a context
    loaded for Wanda, on a calibration file whose Hessian is a 4 TiB hole: RSS grows by the
    weights and the sums of squares only (8 MiB each), never by the Hessian."""
    calib = sparse_calibration(tmp_path / "calib.safetensors")
    assert os.path.getsize(calib) > 4 << 40 and os.stat(calib).st_blocks * 512 < 64 << 20
    ck = wide_checkpoint(tmp_path / "model.safetensors")
    code, res, err = run_limited(f"""
        from aprender.checkpoints import prune_checkpoint
        from aprender.pruning import CalibrationContext
        import numpy as np
        before = peak_kib()
        out = {{}}
        for alloc in ("uniform", "owl"):
            rep = prune_checkpoint({str(ck)!r}, {str(tmp_path / "out")!r} + alloc,
                                   sparsity=0.5, importance="wanda", calibration={str(calib)!r},
                                   allocation=alloc)
            out[alloc] = sum(r["total"] - r["kept"] for r in rep["tensors"])
        ctx = CalibrationContext.load({str(calib)!r}, hessians=False)
        out["has_hessian"] = ctx["l"].has_hessian
        out["grew_kib"] = peak_kib() - before
        print(json.dumps(out))
    """)
    assert code == 0, err[-3000:]
    assert res["uniform"] == res["owl"] == HUGE_D  # half of 2 x 2**20 weights
    assert res["has_hessian"] is False
    assert res["grew_kib"] < 256 << 10, res  # a Hessian read would be 4 TiB (or fail the map)


def test_wanda_on_dask_never_reads_a_4tib_hessian(tmp_path):
    """The Dask front end plans on the client as the local run does and ships the Wanda
    scales, never the calibration file: an in-process cluster under the same limit."""
    pytest.importorskip("distributed")
    calib = sparse_calibration(tmp_path / "calib.safetensors")
    ck = wide_checkpoint(tmp_path / "model.safetensors")
    code, res, err = run_limited(f"""
        import distributed
        from aprender.distributed import prune_checkpoint
        before = peak_kib()
        with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                                dashboard_address=None) as client:
            rep = prune_checkpoint({str(ck)!r}, {str(tmp_path / "out.safetensors")!r},
                                   client=client, sparsity=0.5, importance="wanda",
                                   calibration={str(calib)!r}, allocation="owl")
        print(json.dumps({{"pruned": sum(r["total"] - r["kept"] for r in rep["tensors"]),
                          "grew_kib": peak_kib() - before}}))
    """)
    assert code == 0, err[-3000:]
    assert res["pruned"] == HUGE_D
    assert res["grew_kib"] < 512 << 10, res


def test_wanda_through_torch_never_reads_a_4tib_hessian(tmp_path):
    """A guard more than an attack (this path never read the Hessian): a context loaded with
    hessians=False, as the refusal of a default load advises, prunes through the torch
    interop with RSS untouched by the 16 GiB Hessian."""
    pytest.importorskip("torch")
    calib = sparse_calibration(tmp_path / "calib.safetensors", d=1 << 16)  # a 16 GiB hole
    code, res, err = run_limited(f"""
        import torch
        from aprender.pruning import CalibrationContext
        from aprender.torch import prune_
        before = peak_kib()
        ctx = CalibrationContext.load({str(calib)!r}, hessians=False)
        model = torch.nn.Sequential()
        model.add_module("l", torch.nn.Linear({1 << 16}, 2, bias=False))
        rep = prune_(model, 0.5, importance="wanda", calibration=ctx)
        print(json.dumps({{"pruned": rep[0]["total"] - rep[0]["kept"],
                          "grew_kib": peak_kib() - before}}))
    """, limit=12 << 30)
    assert code == 0, err[-3000:]
    assert res["pruned"] == 1 << 16
    assert res["grew_kib"] < 256 << 10, res  # the Hessian alone is 16 GiB


def test_loading_a_4tib_hessian_is_refused_before_reading(tmp_path):
    """CalibrationContext.load with its Hessians, and SparseGPT at the command line, refuse a
    Hessian larger than the machine in one typed line naming the file and the layer, before
    anything is read."""
    calib = sparse_calibration(tmp_path / "calib.safetensors", layer="model.q\x1b[31m")
    ck = wide_checkpoint(tmp_path / "model.safetensors", layer="model.q\x1b[31m")
    code, res, err = run_limited(f"""
        from aprender.pruning import CalibrationContext
        from aprender.errors import InsufficientMemoryError
        before = peak_kib()
        try:
            CalibrationContext.load({str(calib)!r})
            outcome = "loaded"
        except InsufficientMemoryError as exc:
            outcome = str(exc)
        print(json.dumps({{"outcome": outcome, "grew_kib": peak_kib() - before}}))
    """)
    assert code == 0, err[-3000:]
    msg = res["outcome"]
    assert "calib.safetensors" in msg and "model.q\\x1b[31m" in msg and "TiB" in msg, msg
    assert "hessians=False" in msg and "\n" not in msg
    assert res["grew_kib"] < 64 << 10
    proc = subprocess.run(
        [sys.executable, "-c", "import resource, sys, runpy; "
         "resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30)); "
         "sys.argv = ['aprender'] + sys.argv[1:]; "
         "runpy.run_module('aprender', run_name='__main__')",
         "prune", str(ck), "-o", str(tmp_path / "out"), "--importance", "sparsegpt",
         "--calibration", str(calib), "--sparsity", "0.5"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "calib.safetensors" in line and "model.q\\x1b[31m" in line and "TiB" in line, line
    assert not os.path.exists(tmp_path / "out")


def test_hessian_file_refuses_a_hessian_of_another_size_before_mapping(tmp_path):
    calib = sparse_calibration(tmp_path / "calib.safetensors", d=1 << 14)  # a 1 GiB hole
    hf = HessianFile(calib)
    with pytest.raises(CalibrationFileError, match=r"calib\.safetensors: layer 'l'.*16384 x "
                                                   r"16384.*8 input columns"):
        hf.get("l", 8)


# ----------------------------------------------------------------------------------------------
# the calibration objects' API: typed errors naming the problem, never echoing all of it
# ----------------------------------------------------------------------------------------------

from aprender.errors import (InvalidShapeError, MissingActivationStatsError,  # noqa: E402
                             NumericalInstabilityError, ShapeMismatchError)
from aprender.pruning import (owl_allocation, owl_sparsities, wanda_scale,  # noqa: E402
                              wanda_scores)


def _stats(d=3, count=0, hessian=False):
    st = ActivationStats(d, hessian=hessian)
    if count:
        st.update(np.ones((count, d), np.float32))
    return st


def _ctx(name=LONG, st=None):
    return CalibrationContext({name: _stats() if st is None else st})


W = np.ones((2, 3), np.float32)
F32 = np.ones(3, np.float32)

# id, callable, expected type, built-in base, regex the message must match
CASES = [
    # --- ActivationStats(in_features): sizes refused before allocating ------------------------
    ("stats-10e400", lambda: ActivationStats(10 ** 400),
     InvalidArgumentError, ValueError, r"in_features=10\^400.*about 10\^400 bytes.*address"),
    ("stats-2e62", lambda: ActivationStats(2 ** 62),
     InvalidArgumentError, ValueError, r"in_features=4611686018427387904.*32\.0 EiB"),
    ("stats-2e40", lambda: ActivationStats(2 ** 40),
     InsufficientMemoryError, MemoryError, r"in_features=1099511627776.*8\.0 TiB.*memory"),
    ("stats-1e6-hessian", lambda: ActivationStats(10 ** 6, hessian=True),
     InsufficientMemoryError, MemoryError,
     r"in_features=1000000, hessian=True.*7\.3 TiB \(8000008000000 bytes\)"),
    ("stats-minus-10e5000", lambda: ActivationStats(-10 ** 5000),
     InvalidArgumentError, ValueError, r"in_features must be >= 1, got -10\^5000"),
    # --- ActivationStats.from_arrays: what numpy cannot make an array of ---------------------
    ("from-arrays-ragged-sums", lambda: ActivationStats.from_arrays([[1.0], [1.0, 2.0]], 3),
     CalibrationError, ValueError, r"sum_squares is not an array.*inhomogeneous"),
    ("from-arrays-ragged-hessian",
     lambda: ActivationStats.from_arrays(np.ones(2), 3, [[1.0], [1.0, 2.0]]),
     CalibrationError, ValueError, r"hessian is not an array"),
    ("from-arrays-count-10e400", lambda: ActivationStats.from_arrays(np.ones(2), 10 ** 400),
     CalibrationError, ValueError, r"count must be in \[0, 2\*\*63\), got 10\^400$"),
    # --- wanda_scale / wanda_scores: the layer named, hostile scales refused ------------------
    ("wanda-no-tokens-names-layer",
     lambda: wanda_scale(_stats(), layer="model.layers.0.q"),
     CalibrationError, ValueError, r"^layer 'model\.layers\.0\.q': .*hold no tokens"),
    ("wanda-no-tokens-long-layer",
     lambda: WandaImportance(LONG).compute(W, _ctx()),
     CalibrationError, ValueError, r"^layer 'LLLL.*\.\.\.: .*hold no tokens"),
    ("wanda-overflow-names-layer",
     lambda: wanda_scale(ActivationStats.from_arrays(np.array([1e300, 1.0, 1.0]), 2),
                         layer=LONG),
     NumericalInstabilityError, ValueError, r"^layer 'LLL.*\.\.\.: the input norm of feature 0"),
    ("wanda-scores-negative-scale",
     lambda: wanda_scores(W, np.array([1.0, -1.0, 1.0], np.float32)),
     NumericalInstabilityError, ValueError, r"scale of input feature 1 is -1\.0"),
    ("wanda-scores-nan-scale",
     lambda: wanda_scores(W, np.array([np.nan, 1.0, 1.0], np.float32)),
     NumericalInstabilityError, ValueError, r"scale of input feature 0 is nan"),
    # --- sparsegpt: a workspace beyond the machine refused before the Hessian is read --------
    ("sparsegpt-workspace-8tib",
     lambda: __import__("aprender").pruning.sparsegpt(
         np.ones((2, HUGE_D), np.float32), np.eye(2), 0.5, layer=LONG),
     InsufficientMemoryError, MemoryError,
     r"^layer 'LLL.*\.\.\.: SparseGPT on a 2 x 1048576 weight would need 8\.0 TiB"),
    # --- CalibrationContext: hostile layer names are cut, huge numbers named -----------------
    ("context-missing-lists-long-names", lambda: _ctx()["x"],
     MissingActivationStatsError, ValueError, r"layer 'x'.*holds 1 layer\(s\): 'LLL.*\.\.\."),
    ("context-duplicate-long-name", lambda: _ctx().add_layer_stats(LONG, _stats()),
     CalibrationError, ValueError, r"layer 'LLL.*\.\.\. already has statistics"),
    ("context-bad-stats-long-name", lambda: CalibrationContext().add_layer_stats(LONG, 5),
     InvalidArgumentError, ValueError, r"stats for layer 'LLL.*\.\.\. must be.*got int"),
    ("context-merge-sizes-long-name",
     lambda: _ctx().merge(_ctx(st=_stats(4))),
     ShapeMismatchError, ValueError, r"layer 'LLL.*\.\.\.: 3 input features here, 4"),
    ("context-merge-hessian-long-name",
     lambda: _ctx().merge(_ctx(st=_stats(3, hessian=True))),
     CalibrationError, ValueError, r"layer 'LLL.*\.\.\.: one context has a Hessian"),
    ("context-num-samples-10e5000", lambda: CalibrationContext(num_samples=10 ** 5000),
     InvalidArgumentError, ValueError, r"num_samples must be below 2\*\*63, got 10\^5000"),
    ("block-cos-sum-10e400", lambda: CalibrationContext().add_block_stats("b", 10 ** 400, 5),
     CalibrationError, ValueError, r"block 'b': cos_sum is too large for a float64 \(int 1000"),
    ("block-tokens-10e400", lambda: CalibrationContext().add_block_stats("b", 1.0, 10 ** 400),
     CalibrationError, ValueError, r"token count must be in \[0, 2\*\*63\), got 10\^400$"),
    ("expert-reap-sum-10e400", lambda: CalibrationContext().add_expert_stats("e", 5, 10 ** 400),
     CalibrationError, ValueError, r"expert 'e': reap_sum is too large"),
    # --- OWL: sizes beyond int64, arguments that are not sequences ---------------------------
    ("owl-sizes-beyond-int64", lambda: owl_allocation([0.1, 0.2], [2 ** 62, 2 ** 62], 0.5),
     InvalidArgumentError, ValueError, r"sizes add up to 9223372036854775808 elements"),
    ("owl-sizes-10e400", lambda: owl_allocation([0.1, 0.2], [10 ** 400, 5], 0.5),
     InvalidArgumentError, ValueError, r"sizes add up to 10\^400 elements"),
    ("owl-ratios-not-a-sequence", lambda: owl_allocation(5, [10], 0.5),
     InvalidArgumentError, ValueError, r"ratios must be a sequence, got int 5"),
    ("owl-weights-10e400", lambda: owl_sparsities({"a": F32}, 0.5, weights={"a": 10 ** 400}),
     InvalidArgumentError, ValueError, r"sizes add up to 10\^400"),
]

from aprender.pruning import WandaImportance  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_attack(case):
    check_error(case)


def test_catalogue_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------------------------
# errors about a calibration file's statistics name the file and the layer, at the command line
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sums,count,what", [
    ([1e300, 1.0, 1.0], 2, r"the input norm of feature 0 \(1e\+150\) overflows float32"),
    ([0.0, 0.0, 0.0], 0, r"the calibration statistics hold no tokens"),
], ids=["norm-overflows", "no-tokens"])
@pytest.mark.parametrize("layer", ["model.layers.0.q", LONG], ids=["plain", "5000-characters"])
def test_statistics_errors_name_the_file_and_the_layer(tmp_path, capsys, sums, count, what,
                                                       layer):
    ctx = CalibrationContext({layer: ActivationStats.from_arrays(np.array(sums), count)})
    ctx.save(tmp_path / "calib.safetensors")
    write_safetensors(tmp_path / "m.safetensors", {f"{layer}.weight": W})
    code, err = cli(["prune", tmp_path / "m.safetensors", "-o", tmp_path / "out",
                      "--sparsity", "0.5", "--importance", "wanda",
                      "--calibration", tmp_path / "calib.safetensors"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"layer '" + re.escape(layer[:20]) + r".* of calibration file "
                     r".*calib\.safetensors: " + what, err), err
    assert len(err) < 600 + len(str(tmp_path)) * 2, err
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# OWL: per-row prunes the allocated counts exactly; N:M is refused everywhere
# ----------------------------------------------------------------------------------------------

from aprender import _reference as ref  # noqa: E402
from aprender.checkpoints import prune_checkpoint  # noqa: E402
from aprender.io import SafetensorsFile  # noqa: E402
from aprender.pruning.mask import per_row_count_mask  # noqa: E402

OWL_SHAPES = {"a": (7, 12), "b": (5, 20), "c": (3, 8), "d": (9, 4)}


def _owl_model(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    weights, stats = {}, {}
    for i, (name, (rows, cols)) in enumerate(OWL_SHAPES.items()):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        w[rng.random(w.shape) < 0.02 * (i + 1)] *= 40  # outliers, more in the later layers
        weights[f"{name}.weight"] = w
        stats[name] = ActivationStats.from_arrays(rng.random(cols) * 10 + 0.1, 5)
    write_safetensors(tmp_path / "m.safetensors", weights)
    ctx = CalibrationContext(stats)
    ctx.save(tmp_path / "calib.safetensors")
    return weights, ctx


def _per_row_reference(scores, count):
    """The reference per-row mask with a per-layer count: row i prunes its q + (i < r)
    smallest scores (ties: lowest index), (q, r) = divmod(count, rows)."""
    rows = scores.shape[0]
    q, r = divmod(count, rows)
    keep = np.ones(scores.shape, bool)
    for i in range(rows):
        keep[i, np.argsort(scores[i], kind="stable")[:q + (i < r)]] = False
    return keep


@pytest.mark.parametrize("target,lam", [(0.5, 0.2), (0.37, 0.08), (0.9, 0.3)])
def test_owl_per_row_prunes_exactly_the_allocated_counts(tmp_path, target, lam):
    """The issue's reproduction: per-row OWL pruned rows x round(count / rows) (308 weights of
    a target of 315).  Now each tensor prunes its allocated count exactly (the total is
    round(s x selected)), rows differing by at most one, the mask the reference's."""
    weights, ctx = _owl_model(tmp_path)
    report = prune_checkpoint(tmp_path / "m.safetensors", tmp_path / "out.safetensors",
                              sparsity=target, importance="wanda", pattern="per-row",
                              calibration=tmp_path / "calib.safetensors", allocation="owl",
                              owl_lambda=lam, owl_m=2.0)
    scores = {n: WandaImportance(n).compute(weights[f"{n}.weight"], ctx).values
              for n in OWL_SHAPES}
    alloc = owl_sparsities(scores, target, m=2.0, lam=lam)
    total = sum(w.size for w in weights.values())
    pruned = {r["name"]: r["total"] - r["kept"] for r in report["tensors"]}
    assert sum(pruned.values()) == report["totals"]["pruned"] == ref.prune_count(target, total)
    assert len(set(alloc.counts)) > 1  # OWL moved counts between the layers
    out = SafetensorsFile(tmp_path / "out.safetensors")
    for name, count in zip(alloc.names, alloc.counts):
        assert pruned[f"{name}.weight"] == count
        keep = out.array(f"{name}.weight") != 0
        np.testing.assert_array_equal(keep, _per_row_reference(scores[name], count))
        per_row = (~keep).sum(axis=1)
        assert per_row.max() - per_row.min() <= 1


def test_per_row_count_mask_in_row_chunks_equals_one_piece():
    rng = np.random.default_rng(5)
    s = rng.random((11, 6)).astype(np.float32)
    s[3, :3] = s[3, 3:]  # ties
    for count in (0, 1, 10, 11, 12, 40, 65, 66):
        whole = per_row_count_mask(s, count).keep
        np.testing.assert_array_equal(whole, _per_row_reference(s, count))
        pieces = [per_row_count_mask(s[a:b], count, first_row=a, total_rows=11).keep
                  for a, b in ((0, 4), (4, 5), (5, 11))]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)
    with pytest.raises(InvalidArgumentError, match="count 67 exceeds the 66 elements"):
        per_row_count_mask(s, 67)
    with pytest.raises(InvalidShapeError, match=r"rows \[8, 19\)"):
        per_row_count_mask(s, 3, first_row=8, total_rows=12)


def test_owl_with_an_nm_pattern_is_refused(tmp_path, capsys):
    _owl_model(tmp_path)
    code, err = cli(["prune", tmp_path / "m.safetensors", "-o", tmp_path / "out.safetensors",
                      "--importance", "wanda", "--calibration", tmp_path / "calib.safetensors",
                      "--pattern", "2:4", "--allocation", "owl"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"--allocation owl .* --pattern 2:4 prunes every tensor to 2/4", err), err
    assert not os.path.exists(tmp_path / "out.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"allocation='owl' .* pattern='2:4' "
                                                   r"prunes every tensor to 2/4"):
        prune_checkpoint(tmp_path / "m.safetensors", tmp_path / "out.safetensors",
                         importance="wanda", calibration=tmp_path / "calib.safetensors",
                         pattern="2:4", allocation="owl", dry_run=True)


def test_owl_through_torch_per_row_exact_and_nm_refused():
    torch = pytest.importorskip("torch")
    from aprender.errors import InvalidSparsityError
    from aprender.torch import prune_

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    model = torch.nn.Sequential()
    stats = {}
    for name, (rows, cols) in OWL_SHAPES.items():
        model.add_module(name, torch.nn.Linear(cols, rows, bias=False))
        stats[name] = ActivationStats.from_arrays(rng.random(cols) * 10 + 0.1, 5)
    ctx = CalibrationContext(stats)
    scores = {n: WandaImportance(n).compute(model.get_submodule(n).weight.detach(), ctx).values
              for n in OWL_SHAPES}
    alloc = owl_sparsities(scores, 0.37, m=2.0, lam=0.2)
    with pytest.raises(InvalidSparsityError, match=r"OWL.*N:M pattern 2:4.*2/4"):
        prune_(model, alloc.as_dict(), pattern="2:4", importance="wanda", calibration=ctx)
    report = prune_(model, alloc.as_dict(), pattern="per-row", importance="wanda",
                    calibration=ctx)
    pruned = {r["name"][:-len(".weight")]: r["total"] - r["kept"] for r in report}
    assert pruned == dict(zip(alloc.names, alloc.counts))
    for name, count in zip(alloc.names, alloc.counts):
        keep = model.get_submodule(name).weight.detach().numpy() != 0
        np.testing.assert_array_equal(keep, _per_row_reference(scores[name], count))


# ----------------------------------------------------------------------------------------------
# fuzz: mutated calibration files give a CalibrationFileError / CheckpointError or statistics
# that are valid (and save and load back equal)
# ----------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from aprender.io.safetensors import DTYPE_SIZES  # noqa: E402


def _valid_parts():
    """name -> (dtype, shape, bytes) of a valid format-2 file: two layers sharing one Hessian,
    a layer of its own with a float64 Hessian, a block and an expert; and its metadata."""
    h = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.25], [0.5, 0.25, 2.0]])
    parts = {
        "m.q.sum_squares": ("F64", [3], np.diagonal(h).copy().tobytes()),
        "m.q.count": ("I64", [], np.int64(6).tobytes()),
        "m.q.hessian": ("F32", [3, 3], h.astype(np.float32).tobytes()),
        "m.k.sum_squares": ("F64", [3], np.diagonal(h).copy().tobytes()),
        "m.k.count": ("I64", [], np.int64(6).tobytes()),
        "m.o.sum_squares": ("F64", [2], np.array([1.0, 2.0]).tobytes()),
        "m.o.count": ("I64", [], np.int64(2).tobytes()),
        "m.o.hessian": ("F64", [2, 2], np.array([[1.0, 0.5], [0.5, 2.0]]).tobytes()),
        "model.layers.0.block_cos_sum": ("F64", [], np.float64(5.5).tobytes()),
        "model.layers.0.block_tokens": ("I64", [], np.int64(6).tobytes()),
        "model.layers.0.mlp.experts.1.expert_tokens": ("I64", [], np.int64(3).tobytes()),
        "model.layers.0.mlp.experts.1.expert_reap_sum": ("F64", [], np.float64(1.5).tobytes()),
    }
    meta = {"format": CALIBRATION_FORMAT, "num_samples": "2", "hessian_of": '{"m.k":"m.q"}'}
    return parts, meta


_NAMES = st.sampled_from(["m.q", "m.k", "m.o", "m.x", "", ".", "m.q.", "\x1b[2J", "m" * 300,
                          "model.layers.0", "model.layers.0.mlp.experts.1"])
_SUFFIXES = st.sampled_from(["sum_squares", "count", "hessian", "block_cos_sum", "block_tokens",
                             "expert_tokens", "expert_reap_sum", "weight", "", "Count"])
_SPECIAL = [b"\x00\x00\x00\x00\x00\x00\xf8\x7f", b"\x00\x00\x00\x00\x00\x00\xf0\x7f",
            b"\x00\x00\x00\x00\x00\x00\xf0\xff", b"\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x00\x00\x00\x00\x00\x00\x00\x80", b"\x01\x00\x00\x00\x00\x00\x00\x80",
            b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\xff"]
_META_VALUES = st.one_of(
    st.sampled_from([CALIBRATION_FORMAT, "aprender.calibration/1", "aprender.calibration/9",
                     "pt", "", "0", "-1", "9223372036854775807", "9223372036854775808",
                     "1" * 30, "٣", " 2", '{"m.k":"m.q"}', '{"m.k":"m.o"}', '{"m.q":"m.q"}',
                     '{"m.o":"m.q"}', '{"m.x":"m.q"}', '{"m.k":5}', '["m.k"]', "{", "null",
                     '{"m.k":"m.q","m.k":"m.o"}', '{"m.k":"m.q","model.layers.0":"m.q"}']),
    st.text(max_size=12))


def _mutate_calibration(data):
    parts, meta = _valid_parts()
    names = list(parts)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        what = data.draw(st.sampled_from(["meta", "rename", "dtype", "shape", "bytes", "drop",
                                          "special"]))
        if what == "meta":
            meta[data.draw(st.sampled_from(["format", "num_samples", "hessian_of", "x"]))] = \
                data.draw(_META_VALUES)
            continue
        if not names:
            break
        name = data.draw(st.sampled_from(names))
        dtype, shape, raw = parts[name]
        if what == "rename":
            new = data.draw(_NAMES) + "." + data.draw(_SUFFIXES)
            if new not in parts:
                parts[new] = parts.pop(name)
                names[names.index(name)] = new
        elif what == "dtype":
            parts[name] = (data.draw(st.sampled_from(sorted(DTYPE_SIZES))), shape, raw)
        elif what == "shape":
            parts[name] = (dtype, data.draw(st.lists(st.integers(0, 4), max_size=3)), raw)
        elif what == "bytes":
            parts[name] = (dtype, shape, data.draw(st.binary(min_size=len(raw),
                                                             max_size=len(raw))))
        elif what == "special" and len(raw) >= 4:
            word = data.draw(st.sampled_from([w for w in _SPECIAL if len(w) <= len(raw)]))
            at = data.draw(st.integers(0, (len(raw) - len(word)) // len(word))) * len(word)
            parts[name] = (dtype, shape, raw[:at] + word + raw[at + len(word):])
        elif what == "drop":
            del parts[name]
            names.remove(name)
    # keep the safetensors layer valid (the calibration layer is what is fuzzed): every
    # tensor's bytes fit its dtype and shape, offsets contiguous; sometimes break it anyway
    entries, blob = {}, b""
    for name, (dtype, shape, raw) in parts.items():
        n = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        raw = (raw * (n // max(len(raw), 1) + 1))[:n] if raw else bytes(n)
        entries[name] = {"dtype": dtype, "shape": shape,
                         "data_offsets": [len(blob), len(blob) + n]}
        blob += raw
    if data.draw(st.integers(0, 9)) == 0 and entries:
        victim = data.draw(st.sampled_from(sorted(entries)))
        entries[victim]["data_offsets"][1] += data.draw(st.sampled_from([-8, -1, 1, 8]))
    return encode_header(entries, meta) + blob


def _check_valid(ctx, hessians):
    assert 0 <= ctx.num_samples < 2 ** 63
    for name in ctx:
        s = ctx[name]
        assert 0 <= s.count < 2 ** 63
        assert np.isfinite(s.sum_squares).all() and (s.sum_squares >= 0).all()
        if hessians and s.has_hessian:
            assert s.hessian.shape == (s.in_features,) * 2 and np.isfinite(s.hessian).all()
    for b in ctx.block_stats.values():
        assert 0 <= b.tokens < 2 ** 63 and abs(b.cos_sum) <= b.tokens * (1 + 1e-6) + 1e-6
    for e in ctx.expert_stats.values():
        assert 0 <= e.tokens < 2 ** 63 and e.reap_sum >= 0 and math.isfinite(e.reap_sum)


import math  # noqa: E402


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_calibration_files(tmp_path, data):
    raw = _mutate_calibration(data)
    path = tmp_path / "calib.safetensors"
    path.write_bytes(raw)
    hessians = data.draw(st.booleans(), label="hessians")
    try:
        ctx = CalibrationContext.load(path, hessians=hessians)
    except CheckpointError as exc:  # CalibrationFileError is one
        assert "\n" not in str(exc) and len(str(exc)) < 1000 + len(str(path)), str(exc)
        event(f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc)[len(str(path)) + 2:][:40])}")
        ctx = None
    else:
        event("loaded")
    try:
        hf = HessianFile(path)
    except CheckpointError:
        assert ctx is None  # the layout is checked the same way
        return
    if ctx is None:
        return
    _check_valid(ctx, hessians)
    for name in ctx:
        h = hf.get(name)
        if h is not None:
            assert h.shape == (ctx[name].in_features,) * 2
            if hessians:
                np.testing.assert_array_equal(h, ctx[name].hessian)
    try:
        ctx.save(tmp_path / "again.safetensors")
    except CalibrationError as exc:  # a float64 Hessian beyond float32, which files store
        assert hessians and re.search(r"^layer '.*: Hessian entry .* exceeds the float32 range",
                                      str(exc)), str(exc)
        return
    again = CalibrationContext.load(tmp_path / "again.safetensors", hessians=hessians)
    assert again.layer_names == ctx.layer_names and again.num_samples == ctx.num_samples
    assert again.block_stats == ctx.block_stats and again.expert_stats == ctx.expert_stats
    for name in ctx:
        np.testing.assert_array_equal(again[name].sum_squares, ctx[name].sum_squares)
        assert again[name].count == ctx[name].count


def test_fuzz_base_file_is_valid(tmp_path):
    """The fuzz's starting point loads, so the fuzz explores around a valid file."""
    parts, meta = _valid_parts()
    entries, blob = {}, b""
    for name, (dtype, shape, raw) in parts.items():
        entries[name] = {"dtype": dtype, "shape": shape,
                         "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    (tmp_path / "c.safetensors").write_bytes(encode_header(entries, meta) + blob)
    ctx = CalibrationContext.load(tmp_path / "c.safetensors")
    assert ctx["m.k"].shares_hessian_with(ctx["m.q"]) and ctx["m.o"].hessian[1, 1] == 2.0
    assert ctx.block_stats["model.layers.0"].tokens == 6
    assert ctx.expert_stats["model.layers.0.mlp.experts.1"].reap == 0.5


# more of their kind: arguments of the wrong type, numbers str() refuses


def _hessian_file(tmp_path):
    ctx = CalibrationContext({"a": ActivationStats(3, hessian=True).update(np.ones((2, 3)))})
    ctx.save(tmp_path / "c.safetensors")
    return HessianFile(tmp_path / "c.safetensors")


MORE_CASES = [
    ("load-path-none", lambda tmp: CalibrationContext.load(None),
     InvalidArgumentError, ValueError, r"CalibrationContext\.load needs a path.*NoneType"),
    ("load-hessians-string", lambda tmp: CalibrationContext.load(tmp / "x", hessians="no"),
     InvalidArgumentError, ValueError, r"hessians must be True or False, got 'no'"),
    ("save-path-int", lambda tmp: CalibrationContext().save(5),
     InvalidArgumentError, ValueError, r"CalibrationContext\.save needs a path.*int 5"),
    ("hessian-file-path-none", lambda tmp: HessianFile(None),
     InvalidArgumentError, ValueError, r"HessianFile needs a path.*NoneType"),
    ("hessian-file-layer-list", lambda tmp: _hessian_file(tmp).get(["a"]),
     InvalidArgumentError, ValueError, r"layer names are strings, got list \['a'\]"),
    ("hessian-file-cols-string", lambda tmp: _hessian_file(tmp).get("a", "3"),
     InvalidArgumentError, ValueError, r"cols.*integer.*'3'"),
    ("hessian-file-cols-10e400", lambda tmp: _hessian_file(tmp).get("a", 10 ** 400),
     CalibrationFileError, ValueError, r"layer 'a': the Hessian is 3 x 3 but the weight has "
                                       r"10\^400 input columns"),
    ("update-threads-10e400",
     lambda tmp: ActivationStats(3).update(np.ones((2, 3), np.float32), n_threads=10 ** 400),
     InvalidArgumentError, ValueError, r"n_threads must be at most \d+, got an integer of "
                                       r"1329 bits"),
]


@pytest.mark.parametrize("case", MORE_CASES, ids=lambda c: c[0])
def test_more_attacks(case, tmp_path):
    _id, fn, exc_type, builtin, regex = case
    check_error((_id, lambda: fn(tmp_path), exc_type, builtin, regex))


def test_an_allocation_failure_is_one_typed_line_naming_the_file_and_the_layer(tmp_path, capsys,
                                                                                monkeypatch):
    """What the system refuses (simulated: the sizes here are small) is reported like what is
    refused up front: a typed error naming the calibration file and the layer."""
    layer = "m.q\x1b[2J" + "q" * 300
    ctx = CalibrationContext({layer: ActivationStats(3, hessian=True).update(
        np.random.default_rng(0).standard_normal((8, 3)))})
    ctx.save(tmp_path / "calib.safetensors")
    write_safetensors(tmp_path / "m.safetensors", {f"{layer}.weight": W})

    def no_memory(*args, **kwargs):
        raise MemoryError

    import aprender.pruning.reconstruct as reconstruct

    for target, regex in (("sparsegpt", r"SparseGPT with the Hessian of layer 'm\.q\\x1b\[2Jqqq"
                                        r".*\.\.\. from .*calib\.safetensors cannot allocate its "
                                        r"workspace"),
                          ("_factor", r"layer 'm\.q\\x1b\[2Jqqq.*\.\.\.: SparseGPT cannot "
                                      r"allocate its workspace .*\(Hessian from calibration file "
                                      r".*calib\.safetensors\)$")):
        with monkeypatch.context() as mp:
            mp.setattr(reconstruct, target, no_memory)
            code, err = cli(["prune", tmp_path / "m.safetensors", "-o", tmp_path / "out",
                              "--sparsity", "0.5", "--importance", "sparsegpt",
                              "--calibration", tmp_path / "calib.safetensors"], capsys)
        assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(regex, err), err
        assert len(err) < 600 + 2 * len(str(tmp_path)) and not os.path.exists(tmp_path / "out")
    with monkeypatch.context() as mp:
        mp.setattr(ActivationStats, "from_arrays", no_memory)
        with pytest.raises(InsufficientMemoryError,
                           match=r"calib\.safetensors: layer 'm\.q\\x1b\[2Jqq.*\.\.\.: cannot "
                                 r"allocate its statistics \(96 bytes\)"):
            CalibrationContext.load(tmp_path / "calib.safetensors")


def test_a_bad_hessian_names_the_calibration_file(tmp_path, capsys):
    """SparseGPT reads Hessians where they are used (the load leaves them on disk): an
    infinity found then is reported with the layer and the file it came from."""
    layer = "model.layers.0.q"
    rng = np.random.default_rng(1)
    ctx = CalibrationContext({layer: ActivationStats(3, hessian=True).update(
        rng.standard_normal((8, 3)))})
    ctx.save(tmp_path / "calib.safetensors")
    sf = SafetensorsFile(tmp_path / "calib.safetensors")
    at = sf.data_start + sf.tensors[f"{layer}.hessian"].begin + 4 * 4  # entry (1, 1)
    with open(tmp_path / "calib.safetensors", "r+b") as f:
        f.seek(at)
        f.write(np.float32(np.inf).tobytes())
    write_safetensors(tmp_path / "m.safetensors", {f"{layer}.weight": W})
    code, err = cli(["prune", tmp_path / "m.safetensors", "-o", tmp_path / "out",
                      "--sparsity", "0.5", "--importance", "sparsegpt",
                      "--calibration", tmp_path / "calib.safetensors"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"layer 'model\.layers\.0\.q': the Hessian holds inf at \(1, 1\).*"
                     r"\(Hessian from calibration file .*calib\.safetensors\)$", err), err
