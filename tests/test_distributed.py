"""`aprender prune` on a Dask cluster (aprender.distributed): the output files are byte for byte
those of the local run, faults leave nothing partial behind, and the selection engine's merged
plan equals its streamed plan."""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from aprender._validation import as_floats
from aprender.checkpoints import prune_checkpoint as prune_local
from aprender.checkpoints import make_job
from aprender.errors import CheckpointError, MissingExtraError
from aprender.io import SafetensorsFile, write_safetensors
from aprender.pruning import selection as sel
from aprender.pruning.selection import (ArraySource, GlobalPlan, MergedPlan, PlannedKeeps,
                                        local_map)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds: every wait in this file is bounded


# ----------------------------------------------------------------------------------------------
# the engine: MergedPlan (the reduction a distributed run does) == GlobalPlan, here, no Dask
# ----------------------------------------------------------------------------------------------

def _plans(arrays, sparsity, cap, groups=None):
    srcs = [ArraySource(as_floats(a.reshape(-1)), f"t{i}") for i, a in enumerate(arrays)]
    streamed = GlobalPlan(srcs, sparsity, cap, 1, groups)
    want = [streamed.group_keep(g).copy() for g in range(len(streamed.groups))]
    merged = MergedPlan(srcs, sparsity, cap, 1, groups)
    keeps = PlannedKeeps({g: list(zip([srcs[i] for i in merged.groups[g]], merged.entries(g)))
                          for g in range(len(merged.groups))}, 1)
    # in reverse order: the merged plan's entries need no other unit
    got = [keeps.group_keep(g) for g in reversed(range(len(merged.groups)))][::-1]
    return want, got, merged


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cap", [None, 0.6])
def test_merged_plan_equals_the_streamed_plan(dtype, ties, cap):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(n) for n in (150_000, 3_000, 90_000)]
    if ties:  # a few distinct magnitudes: the tie rule decides most of the threshold's keys
        arrays = [np.round(a * 2) for a in arrays]
    arrays = [a.astype(dtype) for a in arrays]
    want, got, merged = _plans(arrays, 0.55, cap)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    n_keys = sum(a.size for a in arrays)
    if not ties:  # the summaries are small next to the keys (sample + bracket candidates)
        assert merged.received < n_keys * arrays[0].itemsize / 8


def test_merged_plan_radix_fallback_and_groups(monkeypatch):
    rng = np.random.default_rng(2)
    arrays = [np.round(rng.standard_normal(n) * 3).astype(np.float32)
              for n in (200_000, 50, 70_000)]
    monkeypatch.setattr(sel, "_default_budget", lambda *a: 1)  # every bracket "overflows"
    for groups in (None, [[0, 1], [2]]):
        want, got, _ = _plans(arrays, 0.4, 0.5, groups)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)


def test_merged_plan_uses_the_map_it_is_given():
    calls = []

    def pmap(fn, batches, *args):
        calls.append(len(batches))
        return local_map(fn, batches, *args)
    arrays = [np.arange(1, 200_001, dtype=np.float32)[::-1].copy(), np.ones(10, np.float32)]
    srcs = [ArraySource(as_floats(a), "a") for a in arrays]
    MergedPlan(srcs, 0.5, None, 1, pmap=pmap)
    assert calls and all(c == 2 for c in calls)  # one batch per tensor, every pass


# ----------------------------------------------------------------------------------------------
# checkpoints on a LocalCluster of two worker processes
# ----------------------------------------------------------------------------------------------

def _weights(rng, shape, dtype, ties=False):
    w = rng.standard_normal(shape)
    if ties:
        w = np.round(w * 4) / 4
    return w.astype(dtype)


def make_checkpoint(root, rng, dtype=np.float32, ties=False, big=False):
    """A folder of three shards with an index, a config and a tokenizer file; tensors of mixed
    kinds (selected weights, norms, an embedding, ints)."""
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bf16" else dtype
    rows = 256 if big else 32
    root.mkdir()
    shards = {
        "model-00001-of-00003.safetensors": {
            "model.embed_tokens.weight": _weights(rng, (64, 32), dt),
            "model.layers.0.attn.q_proj.weight": _weights(rng, (rows, 64), dt, ties),
            "model.layers.0.input_layernorm.weight": np.ones(64, dt)},
        "model-00002-of-00003.safetensors": {
            "model.layers.0.mlp.up_proj.weight": _weights(rng, (rows * 2, 64), dt, ties),
            "model.layers.0.mlp.up_proj.bias": _weights(rng, (rows * 2,), dt),
            "position_ids": np.arange(12, dtype=np.int64)},
        "model-00003-of-00003.safetensors": {
            "model.layers.1.attn.q_proj.weight": _weights(rng, (rows, 64), dt, ties),
            "model.layers.1.mlp.down_proj.weight": _weights(rng, (64, rows * 2), dt, ties),
            "lm_head.weight": _weights(rng, (64, 64), dt)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        write_safetensors(root / name, tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    return root


def files_of(path):
    """{relative name: bytes} of a file or every file under a folder."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def assert_same_output(local, dist):
    a, b = files_of(local), files_of(dist)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs"


def no_leftovers(folder, keep):
    """Nothing but ``keep`` in folder (no temporary output, no workers' part files)."""
    return sorted(os.listdir(folder)) == sorted(keep)


CASES = {
    "layer": dict(sparsity=0.5),
    "per-row": dict(sparsity=0.3, pattern="per-row"),
    "global-cap": dict(sparsity=0.6, scope="global", max_tensor_sparsity=0.7),
    "2:4-bitmask": dict(pattern="2:4", format="sparse-24-bitmask"),
    "bitmask": dict(sparsity=0.5, format="bitmask"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,ties,big", [("bf16", True, False), (np.float32, False, True)])
def test_same_bytes_as_the_local_run(tmp_path, client, case, dtype, ties, big):
    from aprender.distributed import prune_checkpoint

    rng = np.random.default_rng(3)
    src = make_checkpoint(tmp_path / "in", rng, dtype, ties, big)
    opts = CASES[case]
    want = prune_local(src, tmp_path / "local", **opts)
    got = prune_checkpoint(src, tmp_path / "dask", client=client, **opts)
    assert_same_output(tmp_path / "local", tmp_path / "dask")
    assert got["tensors"] == want["tensors"] and got["totals"]["kept"] == want["totals"]["kept"]
    assert got["distributed"]["workers"] == 2
    if case == "global-cap":
        assert got["distributed"]["received_bytes"]["plan"] > 0
        # the cap binds: one tensor sits exactly at it, and the total is still exact
        assert max(r["sparsity"] for r in got["tensors"]) <= 0.7
    assert no_leftovers(tmp_path, ["in", "local", "dask"])


def test_progress_adds_up_to_the_checkpoint(tmp_path, client):
    from aprender.distributed import prune_checkpoint

    src = make_checkpoint(tmp_path / "in", np.random.default_rng(8))
    calls = []
    rep = prune_checkpoint(src, tmp_path / "o", client=client, sparsity=0.5,
                           progress=lambda n, total: calls.append((n, total)))
    assert len(calls) >= 3  # tensor by tensor as the workers report, at least once per shard
    assert sum(n for n, _ in calls) == rep["totals"]["bytes"]
    assert {t for _, t in calls} == {rep["totals"]["bytes"]}


def test_relative_paths_do_not_depend_on_the_workers_folder(tmp_path, client, monkeypatch):
    from aprender.distributed import prune_checkpoint

    make_checkpoint(tmp_path / "in", np.random.default_rng(11))
    monkeypatch.chdir(tmp_path)  # the workers started elsewhere
    opts = dict(sparsity=0.5, scope="global")
    prune_local("in", "local", **opts)
    prune_checkpoint("in", "dask", client=client, **opts)
    assert_same_output(tmp_path / "local", tmp_path / "dask")
    assert client.run(os.getcwd) and all(d != str(tmp_path) for d in
                                         client.run(os.getcwd).values())


def test_single_file_and_dry_run(tmp_path, client):
    from aprender.distributed import prune_checkpoint

    rng = np.random.default_rng(4)
    src = tmp_path / "m.safetensors"
    write_safetensors(src, {"a.weight": _weights(rng, (64, 64), np.float32),
                            "b.weight": _weights(rng, (32, 64), np.float16)})
    prune_local(src, tmp_path / "local.safetensors", sparsity=0.5, scope="global")
    prune_checkpoint(src, tmp_path / "dask.safetensors", client=client, sparsity=0.5,
                     scope="global")
    assert_same_output(tmp_path / "local.safetensors", tmp_path / "dask.safetensors")
    assert os.stat(tmp_path / "local.safetensors").st_mode == \
        os.stat(tmp_path / "dask.safetensors").st_mode
    want = prune_local(src, dry_run=True, sparsity=0.5, scope="global")
    got = prune_checkpoint(src, client=client, dry_run=True, sparsity=0.5, scope="global")
    assert got["tensors"] == want["tensors"]


@pytest.mark.parametrize("opts", [dict(pattern="per-row", sparsity=0.5),
                                  dict(scope="global", pattern="unstructured", sparsity=0.5),
                                  dict(pattern="2:4"),
                                  dict(pattern="per-row", sparsity=0.5, allocation="owl"),
                                  dict(importance="sparsegpt", sparsity=0.5),
                                  dict(importance="sparsegpt", pattern="2:4",
                                       format="sparse-24-bitmask")],
                         ids=["row", "global", "2:4", "owl", "sparsegpt", "sparsegpt-2:4"])
def test_wanda_with_a_calibration_file(tmp_path, client, opts):
    from aprender.distributed import prune_checkpoint

    torch = pytest.importorskip("torch")
    from aprender.torch import collect_calibration

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 32))
    ctx = collect_calibration(model, [torch.randn(4, 32) * torch.rand(32) * 4 for _ in range(3)],
                              progress=False, hessian=opts.get("importance") == "sparsegpt")
    ctx.save(tmp_path / "calib.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_safetensors(src / "a.safetensors", {"0.weight": state["0.weight"],
                                              "0.bias": state["0.bias"]})
    write_safetensors(src / "b.safetensors", {"2.weight": state["2.weight"],
                                              "2.bias": state["2.bias"]})
    opts = dict({"importance": "wanda"}, **opts, calibration=tmp_path / "calib.safetensors")
    want = prune_local(src, tmp_path / "local", **opts)
    got = prune_checkpoint(src, tmp_path / "dask", client=client, **opts)
    assert_same_output(tmp_path / "local", tmp_path / "dask")
    assert got["tensors"] == want["tensors"]
    # OWL's outlier ratios and the global plan's summaries are computed on the workers
    planned = opts.get("allocation") == "owl" or opts.get("scope") == "global"
    assert (got["distributed"]["received_bytes"]["plan"] > 0) == planned
    assert got["allocation"] == want["allocation"]


# -- faults ------------------------------------------------------------------------------------

def _set_worker_env(client, name, value):
    def put():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    client.run(put)


def _run_and_kill_a_worker(client, stall, run):
    """Run ``run()`` in a thread; kill the worker whose task the test hook holds (by pid, once
    it has said so in ``stall``); return what run returned or raised."""
    from aprender.distributed import TEST_STALL_ENV

    _set_worker_env(client, TEST_STALL_ENV, str(stall))
    box = {}

    def target():
        try:
            box["report"] = run()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
    th = threading.Thread(target=target, daemon=True)
    th.start()
    try:
        # the worker that took shard 0 writes its pid, then waits to be killed
        marker = stall / "stall-0"
        deadline = TIMEOUT * 10
        while not marker.exists() and deadline and th.is_alive():
            th.join(0.1)
            deadline -= 1
        assert marker.exists(), box.get("error")
        pid = int(marker.read_text())
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        th.join(TIMEOUT)
        assert not th.is_alive(), "the distributed run did not finish after the kill"
    finally:
        _set_worker_env(client, TEST_STALL_ENV, None)
    return box


def test_worker_killed_mid_task_is_retried(tmp_path, client):
    from aprender.distributed import prune_checkpoint

    rng = np.random.default_rng(5)
    src = make_checkpoint(tmp_path / "in", rng, np.float32, big=True)
    opts = dict(sparsity=0.6, scope="global")
    prune_local(src, tmp_path / "local", **opts)
    stall = tmp_path / "stall"
    stall.mkdir()
    box = _run_and_kill_a_worker(client, stall, lambda: prune_checkpoint(
        src, tmp_path / "dask", client=client, **opts))
    assert "error" not in box, box.get("error")
    assert_same_output(tmp_path / "local", tmp_path / "dask")
    assert no_leftovers(tmp_path, ["in", "local", "dask", "stall"])
    client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarted the killed worker


def test_shard_a_worker_cannot_read_is_named(tmp_path, client):
    from aprender.distributed import DistributedPruner

    rng = np.random.default_rng(6)
    src = make_checkpoint(tmp_path / "in", rng, np.float32)
    pruner = DistributedPruner(make_job(src, tmp_path / "out", sparsity=0.5), client)
    pruner.prepare()  # the client has read every header (and holds the files open)
    gone = "model-00002-of-00003.safetensors"
    os.rename(src / gone, tmp_path / "elsewhere")  # what a worker without that file sees
    with pytest.raises(CheckpointError) as err:
        pruner._write_all()
    msg = str(err.value)
    assert gone in msg and "worker" in msg, msg
    assert no_leftovers(tmp_path, ["in", "elsewhere"])


@pytest.mark.parametrize("swap", ["renamed-tensor", "symlink"])
def test_shard_replaced_after_planning_is_refused(tmp_path, client, swap):
    """A shard replaced between the client's plan and the worker's read (same size, same
    header length) is not pruned against the old plan: the worker compares inode and
    modification time too."""
    from aprender.distributed import DistributedPruner

    rng = np.random.default_rng(7)
    src = make_checkpoint(tmp_path / "in", rng, np.float32)
    pruner = DistributedPruner(make_job(src, tmp_path / "out", sparsity=0.5), client)
    pruner.prepare()
    name = "model-00003-of-00003.safetensors"
    sf = SafetensorsFile(src / name)
    tensors = {t.name.replace("q_proj", "k_proj"): np.array(sf.array(t.name)) for t in sf}
    other = tmp_path / "other.safetensors"
    write_safetensors(other, tensors, sf.metadata)
    assert os.path.getsize(other) == os.path.getsize(src / name)
    os.unlink(src / name)
    if swap == "symlink":
        os.symlink(other, src / name)
    else:
        os.rename(other, src / name)
    with pytest.raises(CheckpointError, match="not the file that was planned"):
        pruner._write_all()
    assert not (tmp_path / "out").exists()


def test_client_interrupted_leaves_nothing(tmp_path):
    pytest.importorskip("distributed")
    rng = np.random.default_rng(7)
    src = make_checkpoint(tmp_path / "in", rng, np.float32)
    env = dict(os.environ, APRENDER_TEST_PAUSE_AFTER_SHARD="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "aprender", "prune", str(src), "-o",
                             str(tmp_path / "out"), "--sparsity", "0.5", "--quiet",
                             "--dask-workers", "2"], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stderr:  # paused after the first shard landed in the output
            lines.append(line)
            if "aprender-test: paused" in line:
                break
        assert "aprender-test: paused" in "".join(lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=TIMEOUT)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 143, "".join(lines) + rest
    assert no_leftovers(tmp_path, ["in"]), os.listdir(tmp_path)


def test_missing_extra_is_a_typed_error(tmp_path, monkeypatch, capsys):
    from aprender.cli import main
    from aprender.distributed import prune_checkpoint

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    src = tmp_path / "m.safetensors"
    write_safetensors(src, {"a.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(MissingExtraError) as err:
        prune_checkpoint(src, tmp_path / "o.safetensors", sparsity=0.5, dask_workers=2)
    assert isinstance(err.value, ImportError) and "aprender[dask]" in str(err.value)
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
                 "--dask-workers", "2", "--quiet"]) == 1
    assert "aprender[dask]" in capsys.readouterr().err
    assert no_leftovers(tmp_path, ["m.safetensors"])


def test_cli_dask_options(tmp_path, capsys):
    from aprender.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", "x", "-o", "y", "--dask", "tcp://h:1", "--dask-workers", "2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["prune", "x", "-o", "y", "--dask-workers", "0"])
    assert e.value.code == 2


def test_cli_with_a_scheduler_address(tmp_path, client):
    from aprender.cli import main

    src = make_checkpoint(tmp_path / "in", np.random.default_rng(9), "bf16", ties=True)
    args = ["--sparsity", "0.5", "--scope", "global", "--max-tensor-sparsity", "0.6", "--quiet"]
    assert main(["prune", str(src), "-o", str(tmp_path / "local"), *args]) == 0
    assert main(["prune", str(src), "-o", str(tmp_path / "dask"), *args, "--dask",
                 client.scheduler.address]) == 0
    assert_same_output(tmp_path / "local", tmp_path / "dask")


def test_shard_a_worker_cannot_read_during_the_global_plan(tmp_path, client, monkeypatch):
    from aprender.distributed import DistributedPruner

    src = make_checkpoint(tmp_path / "in", np.random.default_rng(10), np.float32)
    pruner = DistributedPruner(make_job(src, tmp_path / "out", sparsity=0.5, scope="global"),
                               client)
    gone = "model-00003-of-00003.safetensors"
    first = DistributedPruner._pmap

    def pmap(self, *args):  # the client has read the headers; the workers will not find it
        if (src / gone).exists():
            os.rename(src / gone, tmp_path / "elsewhere")
        return first(self, *args)
    monkeypatch.setattr(DistributedPruner, "_pmap", pmap)
    with pytest.raises(CheckpointError) as err:
        pruner.run()
    msg = str(err.value)
    assert gone in msg and "worker" in msg, msg
    assert no_leftovers(tmp_path, ["in", "elsewhere"])


def test_cli_dask_workers_starts_its_own_cluster(tmp_path):
    pytest.importorskip("distributed")
    src = make_checkpoint(tmp_path / "in", np.random.default_rng(12), "bf16", ties=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--pattern", "2:4", "--format", "sparse-24-bitmask", "--quiet"]
    for out, extra in (("local", []), ("dask", ["--dask-workers", "2", "--report",
                                                 str(tmp_path / "report.json")])):
        r = subprocess.run([sys.executable, "-m", "aprender", "prune", str(src), "-o",
                            str(tmp_path / out), *args, *extra], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
    assert_same_output(tmp_path / "local", tmp_path / "dask")
    assert json.loads((tmp_path / "report.json").read_text())["distributed"]["workers"] == 2


def test_retries_exhausted_is_a_cluster_error(tmp_path):
    distributed = pytest.importorskip("distributed")
    import dask

    from aprender.distributed import prune_checkpoint
    from aprender.errors import ClusterError

    src = make_checkpoint(tmp_path / "in", np.random.default_rng(13), np.float32)
    stall = tmp_path / "stall"
    stall.mkdir()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     host="127.0.0.1", dashboard_address=None, memory_limit=0,
                                     silence_logs=50) as cluster, \
            distributed.Client(cluster, timeout=TIMEOUT) as c:
        box = _run_and_kill_a_worker(c, stall, lambda: prune_checkpoint(
            src, tmp_path / "out", client=c, sparsity=0.5))
    assert isinstance(box.get("error"), ClusterError), box
    assert "KilledWorker" in str(box["error"])
    assert no_leftovers(tmp_path, ["in", "stall"])
