"""The catalogue of attacks on the Dask front end (``--dask ADDRESS``, ``--dask-workers N``,
:mod:`aprender.distributed`): nothing written outside OUTPUT's folder (the cluster's scratch space
included), nothing listening beyond loopback, malformed addresses are usage errors, Ctrl-C
leaves nothing and prints no worker's traceback, and a calibration file replaced after planning
is refused on the workers as the local run refuses it."""
import ipaddress
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

try:
    import distributed
except ImportError:  # the interop environment has no Dask; it deselects these tests anyway
    distributed = None


@pytest.fixture(autouse=True)
def _needs_dask():
    """Per test, not at import: a module-level skip fails collection in CI wherever Dask is
    absent, also where these tests are deselected (the interop run)."""
    pytest.importorskip("distributed")

from aprender.checkpoints import CheckpointPruner, make_job  # noqa: E402
from aprender.cli import main  # noqa: E402
from aprender.errors import CheckpointError, InvalidArgumentError  # noqa: E402
from aprender.io import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


def _checkpoint(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(3):
        write_safetensors(root / f"s{s}.safetensors",
                          {f"l{s}.{i}.weight": rng.standard_normal((32, 64)).astype(np.float32)
                           for i in range(2)})
    (root / "config.json").write_text("{}")
    return root


def _env(tmp_path, **extra):
    """The CLI's environment: the system temporary folder is a test folder (to see what is
    left there)."""
    systmp = tmp_path / "systmp"
    systmp.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TMPDIR=str(systmp), **extra)


def _loopback(host):
    return ipaddress.ip_address(host.strip("[]")).is_loopback


# ----------------------------------------------------------------------------------------------
# --dask-workers: scratch space under OUTPUT's temporary folder, removed with it
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dry_run", [False, True], ids=["write", "dry-run"])
def test_local_cluster_leaves_nothing_in_the_temporary_folder(tmp_path, dry_run):
    src = _checkpoint(tmp_path / "in")
    args = [sys.executable, "-m", "aprender", "prune", str(src), "-o", str(tmp_path / "out"),
            "--sparsity", "0.5", "--quiet", "--dask-workers", "2"]
    r = subprocess.run(args + (["--dry-run"] if dry_run else []), env=_env(tmp_path), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "systmp") == []  # no dask-scratch-space, no lock files
    assert sorted(os.listdir(tmp_path)) == sorted(["in", "systmp"] + ([] if dry_run
                                                                       else ["out"]))


def test_scratch_space_is_the_folder_given(tmp_path):
    from aprender.distributed import dask_client

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with dask_client(n_workers=1, scratch=str(scratch)) as c:
        dirs = c.run(lambda dask_worker: dask_worker.local_directory)
        assert dirs and all(os.path.realpath(d).startswith(os.path.realpath(scratch) + os.sep)
                            for d in dirs.values()), dirs
        assert "dask-scratch-space" in os.listdir(scratch)


# ----------------------------------------------------------------------------------------------
# --dask-workers: loopback only, no dashboard
# ----------------------------------------------------------------------------------------------

def _http_sockets(server):
    http = getattr(server, "http_server", None)
    return [s.getsockname()[0] for s in getattr(http, "_sockets", {}).values()]


def test_local_cluster_listens_on_loopback_only(tmp_path):
    from aprender.distributed import dask_client

    with dask_client(n_workers=2, scratch=str(tmp_path)) as c:
        info = c.scheduler_info()
        addresses = [info["address"]]
        for addr, w in info["workers"].items():
            addresses += [addr, w["nanny"]]
        # Dask's HTTP server always runs (named "dashboard" among the services): no dashboard
        # page is served from it
        port = info.get("services", {}).get("dashboard")
        if port is not None:
            import urllib.error
            import urllib.request

            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=TIMEOUT)
            assert e.value.code == 404
        hosts = [distributed.comm.get_address_host(a) for a in addresses]
        hosts += c.run_on_scheduler(lambda dask_scheduler: _http_sockets(dask_scheduler))
        for got in c.run(lambda dask_worker: _http_sockets(dask_worker)).values():
            hosts += got
        assert len(hosts) >= 1 + 2 * 2 + 1
        assert all(_loopback(h) for h in hosts), hosts
        assert c.cluster.dashboard_link is None or "127.0.0.1" in c.cluster.dashboard_link


# ----------------------------------------------------------------------------------------------
# --dask ADDRESS: a malformed address is a usage error, before anything starts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["", "nonsense", "foo://bar:1", "tcp://[::1",
                                     "tcp://host:notaport", "tcp://host:0", "tcp://host:65536",
                                     "tcp://:8786", "tcp://bad host:1", "tcp://[nothex]:1",
                                     "inproc://x:1", "tcp://h\x1b[2J:1"])
def test_malformed_dask_address_is_a_usage_error(tmp_path, capsys, address):
    from aprender.distributed import prune_checkpoint

    src = tmp_path / "m.safetensors"
    write_safetensors(src, {"a.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(SystemExit) as e:
        main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5",
              "--dask", address])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "\x1b" not in err, err
    assert "--dask" in err
    with pytest.raises(InvalidArgumentError):
        prune_checkpoint(src, tmp_path / "o.safetensors", sparsity=0.5, dask_address=address)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "127.0.0.1:1", "tls://h.example:9",
                                     "tcp://[::1]:8786", "ws://a-b.c:65535"])
def test_well_formed_dask_addresses_pass(address):
    from aprender.distributed import parse_address

    assert parse_address(address) == address


# ----------------------------------------------------------------------------------------------
# Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) during a
# --dask-workers run: exit 130, nothing left, no traceback from the workers, no atexit error
# ----------------------------------------------------------------------------------------------

def _listening(pid):
    """(pid, host) of every listening inet socket of the process and its descendants."""
    psutil = pytest.importorskip("psutil")
    out = []
    root = psutil.Process(pid)
    for p in [root] + root.children(recursive=True):
        for c in p.net_connections("inet"):
            if c.status == psutil.CONN_LISTEN:
                out.append((p.pid, c.laddr.ip))
    return out


@pytest.mark.parametrize("when", ["mid-run", "cluster-start"])
def test_ctrl_c_during_a_local_cluster_run(tmp_path, when):
    src = _checkpoint(tmp_path / "in")
    switch = ("APRENDER_TEST_PAUSE_AFTER_SHARD" if when == "mid-run"
              else "APRENDER_TEST_PAUSE_CLUSTER_START")
    p = subprocess.Popen([sys.executable, "-m", "aprender", "prune", str(src), "-o",
                          str(tmp_path / "out"), "--sparsity", "0.5", "--quiet",
                          "--dask-workers", "2"], env=_env(tmp_path, **{switch: "1"}), cwd=ROOT,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in p.stderr:  # paused: after the first shard, or while the workers start
            lines.append(line)
            if line.startswith("aprender-test:"):
                break
        assert lines and lines[-1].startswith("aprender-test:"), "".join(lines)
        listening = _listening(p.pid)
        assert listening and all(_loopback(h) for _, h in listening), listening
        os.killpg(p.pid, signal.SIGINT)
        err = p.communicate(timeout=TIMEOUT)[1]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(TIMEOUT)
    assert p.returncode == 130, "".join(lines) + err
    assert err.strip().splitlines()[-1] == "aprender: interrupted; partial output removed", err
    for word in ("Traceback", "KeyboardInterrupt", "AssertionError", "Exception"):
        assert word not in err, err
    assert sorted(os.listdir(tmp_path)) == ["in", "systmp"]
    assert os.listdir(tmp_path / "systmp") == []


# ----------------------------------------------------------------------------------------------
# OUTPUT appearing during a --dask-workers run is refused (the client commits)
# ----------------------------------------------------------------------------------------------

def test_output_appearing_during_a_local_cluster_run_is_refused(tmp_path):
    src = _checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "aprender", "prune", str(src), "-o", str(out),
                          "--sparsity", "0.5", "--quiet", "--dask-workers", "2"],
                         env=_env(tmp_path, APRENDER_TEST_PAUSE_BEFORE_COMMIT=str(out)),
                         cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.strip() == "aprender-test: commit paused", line + p.stderr.read()
    # at the rename: the output being committed and the cluster's scratch folder, both next to
    # OUTPUT; nothing in the system's temporary folder
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".aprender-tmp")]
    assert len(temps) == 2, os.listdir(tmp_path)
    assert sum("dask-scratch-space" in os.listdir(tmp_path / n) for n in temps) == 1, temps
    assert os.listdir(tmp_path / "systmp") == []
    out.mkdir()
    (out / "precious.txt").write_text("not yours")
    _, err = p.communicate("\n", timeout=TIMEOUT)
    assert p.returncode == 1 and "appeared while the run was in progress" in err, err
    assert os.listdir(out) == ["precious.txt"]
    assert sorted(os.listdir(tmp_path)) == ["in", "out", "systmp"]
    assert os.listdir(tmp_path / "systmp") == []


# ----------------------------------------------------------------------------------------------
# a calibration file replaced after planning: the workers check its identity as they check
# shards, so a Dask run refuses it where the local run does
# ----------------------------------------------------------------------------------------------

def _calibrated(tmp_path, hessian):
    torch = pytest.importorskip("torch")
    from aprender.torch import collect_calibration

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 32))
    batches = [torch.randn(4, 32) * torch.rand(32) * 4 for _ in range(3)]
    ctx = collect_calibration(model, batches, progress=False, hessian=hessian)
    ctx.save(tmp_path / "calib.safetensors")
    # the same layers and sizes, other statistics: what a replaced file holds
    other = collect_calibration(model, [b.flip(0) * 3 for b in batches], progress=False,
                                hessian=hessian)
    other.save(tmp_path / "other.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_safetensors(src / "a.safetensors", {"0.weight": state["0.weight"]})
    write_safetensors(src / "b.safetensors", {"2.weight": state["2.weight"]})
    return src


@pytest.mark.parametrize("importance", ["sparsegpt", "wanda"])
def test_calibration_replaced_after_planning(tmp_path, client, importance):
    from aprender.distributed import DistributedPruner

    src = _calibrated(tmp_path, importance == "sparsegpt")
    calib = tmp_path / "calib.safetensors"
    original, replacement = calib.read_bytes(), (tmp_path / "other.safetensors").read_bytes()
    os.unlink(tmp_path / "other.safetensors")
    outcome = {}
    for where in ("local", "dask"):
        calib.write_bytes(original)
        job = make_job(src, tmp_path / where, sparsity=0.5, importance=importance,
                       calibration=calib)
        pruner = CheckpointPruner(job) if where == "local" else DistributedPruner(job, client)
        pruner.prepare()  # statistics read, Hessians opened, paths checked
        (tmp_path / "new").write_bytes(replacement)
        os.replace(tmp_path / "new", calib)  # same layers and sizes, other statistics
        try:
            pruner._write_all()
            outcome[where] = "written"
        except CheckpointError as exc:
            assert "calib.safetensors" in str(exc), exc
            assert not (tmp_path / where).exists()
            outcome[where] = "refused"
    # SparseGPT maps each Hessian when it prunes the tensor (so a replaced file is seen and
    # refused); Wanda's statistics were read while planning (the replaced file is never read)
    want = "refused" if importance == "sparsegpt" else "written"
    assert outcome == {"local": want, "dask": want}
    if want == "written":
        for name in ("a.safetensors", "b.safetensors"):
            assert (tmp_path / "local" / name).read_bytes() == \
                (tmp_path / "dask" / name).read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(["in", "calib.safetensors"]
                                                  + (["local", "dask"] if want == "written"
                                                     else []))


def test_a_cluster_that_cannot_start_is_a_typed_error(tmp_path, monkeypatch, capsys):
    """What Dask raises while the local cluster starts (workers that never arrive, ...) is a
    ClusterError: one line at the command line, nothing left (the scratch folder included)."""
    from aprender.distributed import prune_checkpoint
    from aprender.errors import ClusterError

    def broken(*args, **kwargs):
        raise RuntimeError("Only 0/2 workers arrived after 300")
    monkeypatch.setattr(distributed, "LocalCluster", broken)
    src = _checkpoint(tmp_path / "in")
    with pytest.raises(ClusterError, match="workers arrived"):
        prune_checkpoint(src, tmp_path / "out", sparsity=0.5, dask_workers=2)
    assert main(["prune", str(src), "-o", str(tmp_path / "out"), "--sparsity", "0.5",
                 "--quiet", "--dask-workers", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "workers arrived" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"]
