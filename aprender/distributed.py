"""Prune a checkpoint on a Dask cluster with the exact output of the local run.

    from aprender.distributed import prune_checkpoint
    prune_checkpoint("in/", "out/", sparsity=0.5, scope="global", client=client)   # a Client
    prune_checkpoint("in/", "out/", sparsity=0.5, dask_workers=4)   # a LocalCluster here

A front end over :class:`aprender.checkpoints.CheckpointPruner` (the local run): the client reads
the headers, checks the paths, selects the tensors and loads the calibration exactly as the local
run does; then

* global scope: the selection engine's :class:`~aprender.pruning.selection.MergedPlan` runs its
  per-tensor passes (bracket sample, counts below and inside the bracket with the candidates, a
  radix histogram when the bracket misses) as tasks, one per tensor, and reduces their small
  results on the client: the same threshold and tie rule as the local run, and a plan entry per
  tensor that needs no other tensor;
* every shard is a task: the worker memory-maps the shard from the shared filesystem and writes it
  with the local run's own ``_write_shard`` into a fresh file of a temporary folder next to
  OUTPUT; the client moves each finished shard into the output's temporary folder in shard order,
  then copies the other files, writes the index and config and renames the output into place
  (the local run's code, unchanged).

A task that dies with its worker is run again by Dask (its part file has a fresh name, so a
half-written one is never used); anything raised on a worker reaches the client, which removes
every temporary file.  Dask is an optional extra: ``pip install "aprender[dask]"``.
"""
import asyncio
import contextlib
import ipaddress
import logging
import os
import pickle
import queue
import re
import signal
import sys
import tempfile
import threading
import uuid

from ._validation import short_repr
from .checkpoints import CheckpointPruner, make_job, outlier_ratio
from .errors import (CheckpointError, ClusterError, InvalidArgumentError, MissingExtraError,
                     PruningError)
from .io.checkpoint import CheckpointWriter
from .io.files import TMP_SUFFIX, create_new, display, remove_tree, temp_name
from .io.safetensors import _reopen
from .pruning.selection import MergedPlan, PlannedKeeps

__all__ = ["prune_checkpoint", "DistributedPruner", "dask_client", "parse_address"]

EXTRA = 'pip install "aprender[dask]"'
TEST_STALL_ENV = "APRENDER_TEST_STALL_DIR"


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise MissingExtraError(f"running on a Dask cluster needs dask.distributed "
                                f"({exc}); install it with: {EXTRA}") from None
    return distributed


_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


def parse_address(address):
    """A Dask scheduler address ``[SCHEME://]HOST:PORT`` (SCHEME tcp, tls, ws, wss or ucx; HOST
    a name, an IPv4 address or an IPv6 address in brackets; PORT 1 to 65535) as given, or an
    InvalidArgumentError saying what is wrong with it (before any connection is tried)."""
    shown = display(short_repr(address))
    if not isinstance(address, str) or not address.strip():
        raise InvalidArgumentError(f"scheduler address {shown} is empty")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in _SCHEMES:
        raise InvalidArgumentError(f"scheduler address {shown}: unknown protocol "
                                   f"{display(short_repr(scheme))} (use "
                                   f"{', '.join(s + '://' for s in _SCHEMES)})")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise InvalidArgumentError(f"scheduler address {shown}: expected "
                                   "[PROTOCOL://]HOST:PORT")
    if host.startswith("["):
        ok = host.endswith("]")
        if ok:
            try:
                ok = ipaddress.ip_address(host[1:-1]).version == 6
            except ValueError:
                ok = False
    else:
        ok = _HOST.fullmatch(host) is not None
    if not ok:
        raise InvalidArgumentError(f"scheduler address {shown}: {display(short_repr(host))} is "
                                   "not a host name, an IPv4 address or an IPv6 address in "
                                   "brackets")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise InvalidArgumentError(f"scheduler address {shown}: port {display(short_repr(port))}"
                                   " is not a number from 1 to 65535")
    return address


LOOPBACK = "127.0.0.1"
PAUSE_CLUSTER_ENV = "APRENDER_TEST_PAUSE_CLUSTER_START"


def _test_pause_cluster_start():
    """Test-only: with APRENDER_TEST_PAUSE_CLUSTER_START=1 the local cluster's workers are
    asked for, and then the client says so on stderr and waits for a signal before it waits
    for them: an interrupt while the cluster starts, without timing."""
    if os.environ.get(PAUSE_CLUSTER_ENV) == "1":
        import time

        print("aprender-test: cluster starting", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.05)


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread (and in every thread and process started from it, which
    inherit the mask: the local cluster's event loop and, through it, its worker processes)
    while the body runs; a Ctrl-C that arrived meanwhile is delivered when it ends.  A
    terminal's Ctrl-C reaches every process of the foreground group: the workers then never
    see it (no tracebacks of theirs) and are stopped by the client, which does see it."""
    if not hasattr(signal, "pthread_sigmask") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    # multiprocessing's resource tracker, started on first use, unblocks SIGINT in the thread
    # that starts it (the cluster's event loop would be that thread): start it here, first
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def dask_client(address=None, n_workers=None, scratch=None):
    """A ``distributed.Client``: to the scheduler at ``address``, or to a LocalCluster of
    ``n_workers`` worker processes on this machine (one task at a time each, the machine's
    cores shared among them; no memory limit: the shards' memory maps are file pages, which a
    worker's limit would count), closed on exit.

    The local cluster listens on the loopback interface only (scheduler, workers, nannies and
    their HTTP servers), shows no dashboard, and keeps its scratch space (``dask-scratch-space``,
    lock files) in the folder ``scratch`` (None: Dask's default), which the caller removes."""
    distributed = _distributed()
    if (address is None) == (n_workers is None):
        raise InvalidArgumentError("give a scheduler address or a number of workers")
    if address is not None:
        with distributed.Client(parse_address(address), timeout="60s") as client:
            yield client
        return
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise InvalidArgumentError(f"n_workers must be a whole number >= 1, got {n_workers!r}")
    import dask

    per = max(1, len(os.sched_getaffinity(0)) // n_workers) if hasattr(os, "sched_getaffinity") \
        else 1
    config = {"temporary-directory": scratch} if scratch is not None else {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(config))
        with _sigint_blocked():
            # Dask's HTTP server starts even without a dashboard: on loopback, any free port (a
            # fixed one clashes with any other cluster on the machine).  The cluster's own
            # warnings (a worker slow to stop) are not the user's business: errors only
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=0, threads_per_worker=1, processes=True, memory_limit=0,
                host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0",
                scheduler_kwargs={"dashboard": False}, worker_dashboard_address=None,
                local_directory=scratch, silence_logs=logging.ERROR,
                env={"OMP_NUM_THREADS": str(per)}))
            cluster.scale(n_workers)
        _test_pause_cluster_start()
        client = stack.enter_context(distributed.Client(cluster))
        client.wait_for_workers(n_workers, timeout=300)
        yield client


def prune_checkpoint(input, output=None, *, client=None, dask_address=None, dask_workers=None,
                     progress=None, **options):
    """:func:`aprender.checkpoints.prune_checkpoint` on a Dask cluster: ``client`` (a
    ``distributed.Client``), or ``dask_address`` (a running scheduler), or ``dask_workers`` (a
    LocalCluster of that many processes for this call, started once the paths are checked,
    its scratch space under a temporary folder next to OUTPUT, removed with it).  Same options,
    same output files, same report (plus ``report["distributed"]``)."""
    job = make_job(input, output, **options)
    if client is not None:
        if dask_address is not None or dask_workers is not None:
            raise InvalidArgumentError("give client, dask_address or dask_workers, not several")
        return DistributedPruner(job, client, progress).run()
    # the options are checked before a cluster is started
    return DistributedPruner(job, None, progress, address=dask_address,
                             workers=dask_workers).run()


# ----------------------------------------------------------------------------------------------
# the client
# ----------------------------------------------------------------------------------------------

class DistributedPruner(CheckpointPruner):
    """The local run with the global plan's passes and the shards as Dask tasks."""

    def __init__(self, job, client, progress=None, *, address=None, workers=None):
        super().__init__(job, progress)
        self.client = client
        self.received = {"plan": 0, "shards": 0}  # pickled bytes of the results the client got
        if client is None:
            if (address is None) == (workers is None):
                raise InvalidArgumentError("give a client, a scheduler address or a number of "
                                           "workers")
            if address is not None:
                parse_address(address)
        self._cluster = (address, workers)
        self._stack = self._scratch = None

    def run(self):
        """The local run's steps; a cluster of its own (address or workers) is started once the
        paths are checked and closed (its scratch space removed) however the run ends."""
        try:
            return super().run()
        finally:
            if self._stack is not None:
                stack, self._stack = self._stack, None
                try:
                    stack.close()
                finally:
                    self.client = self._scratch = None

    def _check_paths(self, ckpt):
        super()._check_paths(ckpt)
        if self.client is None:
            self._start_cluster()

    def _start_cluster(self):
        address, workers = self._cluster
        self._stack = stack = contextlib.ExitStack()
        scratch = None
        if workers is not None:
            # the cluster's scratch space: a temporary folder next to OUTPUT (beside the system
            # temporary folder for a dry run), removed after the cluster has stopped
            scratch = (temp_name(self.target.path, "dir") if self.target is not None else
                       tempfile.mkdtemp(prefix="aprender-dask-", suffix=TMP_SUFFIX))
            stack.callback(remove_tree, scratch)
            if self.target is not None:
                self._scratch = scratch
        with _cluster_failures():  # a worker that never starts: a ClusterError, no traceback
            self.client = stack.enter_context(dask_client(address, workers, scratch))

    # -- global scope: the engine's passes as tasks, reduced here ---------------------------
    def _global_plan(self, units, groups):
        return MergedPlan(units, self.sparsity, self.args.max_tensor_sparsity, self.nt, groups,
                          pmap=self._pmap)

    def _pmap(self, fn, batches, *args):
        return self._map(_run_batch, batches, fn=fn, args=args)

    def _outlier_ratios(self, tensors):
        return self._map(_ratio_task, tensors, m=self.owl_m)

    def _map(self, task, items, **kwargs):
        """task(item, **kwargs) for every item, as tasks; the results in order."""
        futs = self.client.map(task, items, threads=self.args.threads, pure=False, **kwargs)
        try:
            with _cluster_failures():
                out = self.client.gather(futs)
        except BaseException:
            self.client.cancel(futs)
            raise
        self.received["plan"] += sum(len(pickle.dumps(r, protocol=5)) for r in out)
        return out

    # -- shards -----------------------------------------------------------------------------
    def _tasks(self, parts):
        """One task per shard: (shard, future)."""
        ckpt = self.ckpt
        futs = []
        self._topic = f"aprender-progress-{uuid.uuid4().hex}" if self.progress else None
        for no, s in enumerate(ckpt.shards):
            sel = {k: i for k, i in self.sel_index.items() if k[0] == s}
            names = [name for _, name in sel]
            keeps = None
            if self.args.scope == "global":
                keeps = {i: list(zip([self.plan.units[u] for u in self.plan.groups[i]],
                                     self.plan.entries(i))) for i in sel.values()}
            sf = ckpt.files[s]
            state = {"sel": sel, "keeps": keeps,
                     "scales": {n: self.scales[n] for n in names} if self.wanda else None,
                     "layer_sparsity": {n: v for n, v in self.layer_sparsity.items()
                                        if n in names},
                     # SparseGPT: the worker maps the Hessians it needs from the file itself,
                     # checked to be the file the client read (as the shards are: the pickled
                     # SafetensorsFile inside carries its identity)
                     "hessians": self.hessians if self.sgpt else None}
            futs.append((s, self.client.submit(
                _shard_task, self.args, s, ckpt.shard_path(s),
                (os.path.abspath(sf.path), sf.size, sf.header_len, *sf.identity[1:3]),
                ckpt.is_dir, state, parts, no, self._topic, pure=False, key=f"aprender-shard-{no}-"
                f"{uuid.uuid4().hex}")))
        return futs

    def _collect(self, futs, each):
        """Each shard's result in shard order; progress as the workers report tensors (a
        retried shard is not counted twice: each shard adds at most its bytes)."""
        sizes = [sum(t.nbytes for t in self.ckpt.files[s]) for s, _ in futs]
        shown = [0] * len(futs)
        events = queue.SimpleQueue()

        def show(no, n):
            n = min(n, sizes[no] - shown[no])
            if n > 0:
                shown[no] += n
                self._tick(n)

        def drain():
            while True:
                try:
                    no, n = events.get_nowait()
                except queue.Empty:
                    return
                show(no, n)
        if self._topic:
            self.client.subscribe_topic(self._topic, lambda ev: events.put(ev[1]))
        try:
            with _cluster_failures():
                for no, (s, f) in enumerate(futs):
                    while self._topic:
                        try:
                            res = f.result(timeout=0.2)
                            break
                        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11
                            drain()
                    else:
                        res = f.result()
                    self.received["shards"] += len(pickle.dumps(res, protocol=5))
                    self.rows += res["rows"]
                    each(s, res)
                    drain()
                    show(no, sizes[no])
        except BaseException:
            self.client.cancel([f for _, f in futs])
            raise
        finally:
            if self._topic:
                self.client.unsubscribe_topic(self._topic)

    def _dry_run(self):
        self._collect(self._tasks(None), lambda s, res: None)

    def _write_shards(self, writer):
        # the workers' files: next to OUTPUT (same filesystem: moved, not copied), inside the
        # local cluster's scratch folder when the run has one
        parts = (tempfile.mkdtemp(prefix="parts-", dir=self._scratch) if self._scratch else
                 temp_name(self.target.path, "dir"))

        def place(s, res):
            if os.path.dirname(res["part"]) != parts:
                raise CheckpointError(f"shard {display(s)}: a worker returned a file outside "
                                      "the run's folder")
            if self.ckpt.is_dir:
                os.close(create_new(writer.tmp, s))  # the same name checks as the local run
                os.replace(res["part"], os.path.join(writer.tmp, s))
            else:
                os.replace(res["part"], writer.tmp)
            writer._done(s, res["names"], res["size"], res["elements"])
        try:
            self._collect(self._tasks(parts), place)
        finally:
            remove_tree(parts)

    def _report(self, skipped, total_bytes, wall):
        report = super()._report(skipped, total_bytes, wall)
        report["distributed"] = {"workers": len(self.client.nthreads()),
                                 "received_bytes": dict(self.received)}
        return report


@contextlib.contextmanager
def _cluster_failures():
    """What the cluster itself raises (KilledWorker once a task's workers died more often than
    the scheduler allows, a lost scheduler) as a ClusterError; aprender's own errors and the
    user's interrupts pass as they are."""
    try:
        yield
    except (PruningError, OSError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise ClusterError(f"the Dask run failed: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# the workers
# ----------------------------------------------------------------------------------------------

def _where():
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return "this process"


@contextlib.contextmanager
def _named_failures():
    """A file a worker cannot read or write is named with the worker that tried."""
    try:
        yield
    except CheckpointError as exc:
        raise CheckpointError(f"on {_where()}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"on {_where()}: {display(exc.filename or '')}: "
                              f"{exc.strerror or exc}") from None


def _worker_threads(threads):
    from ._validation import resolve_threads

    return resolve_threads(threads)


def _run_batch(batch, fn, args, threads):
    """One tensor's units through a selection pass (``args``' last item, the thread count, is
    resolved here, on the worker)."""
    nt = _worker_threads(threads)
    args = tuple(args[:-1]) + (nt,)
    with _named_failures():
        for u, _ in batch:
            if hasattr(u, "nt"):
                u.nt = nt
        return [fn(u, extra, *args) for u, extra in batch]


def _ratio_task(units, m, threads):
    """OWL's outlier ratio of one tensor, on a worker."""
    nt = _worker_threads(threads)
    with _named_failures():
        for u in units:
            u.nt = nt
        return outlier_ratio(units, m, nt)


class _ShardView:
    """The part of a Checkpoint a shard task reads: one shard."""

    def __init__(self, shard, path, planned, is_dir):
        self.shards = [shard]
        self.is_dir = is_dir
        self._path = path  # as the client names it (errors); planned[0]: its absolute path
        self.files = {shard: _reopen(*planned)}

    def shard_path(self, shard):
        return self._path


class _PartWriter(CheckpointWriter):
    """Writes one shard into a fresh file of the parts folder (never a name a retry reuses)."""

    def __init__(self, ckpt, parts, no):
        self.ckpt, self.tmp, self._pause = ckpt, parts, None
        self.weight_map, self.sizes, self.elements = {}, {}, {}
        self.part = os.path.join(parts, f"{no}-{uuid.uuid4().hex}.part")

    def shard(self, shard, metadata, planned=None):
        from .io.checkpoint import ShardWriter

        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o644 if self.ckpt.is_dir else 0o666)
        return ShardWriter(self, shard, fd, metadata, planned)


def _test_stall(no):
    """Test-only: with APRENDER_TEST_STALL_DIR set in a worker, the first attempt of shard 0
    writes the worker's pid to ``stall-0`` there and waits to be killed (bounded), so a test
    can kill a worker in the middle of a task without racing it."""
    d = os.environ.get(TEST_STALL_ENV)
    if not d or no != 0:
        return
    try:
        os.close(os.open(os.path.join(d, "claimed-0"), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # a retry
    with open(os.path.join(d, "pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(d, "pid.tmp"), os.path.join(d, "stall-0"))  # appears complete
    import time

    for _ in range(2400):  # at most two minutes, then the task goes on
        time.sleep(0.05)


def _progress_events(topic, no):
    """The worker's progress callback: each tensor's bytes as an event for the client."""
    if topic is None:
        return None
    from distributed import get_worker

    worker = get_worker()
    return lambda nbytes, _total: worker.log_event(topic, (no, nbytes))


def _shard_task(job, shard, path, planned, is_dir, state, parts, no, topic):
    """Prune one shard on a worker with the local run's code; returns its rows and, when
    writing, the part file, its tensor names and data size."""
    with _named_failures():
        pruner = CheckpointPruner(job, _progress_events(topic, no))
        pruner.ckpt = view = _ShardView(shard, path, planned, is_dir)
        pruner.sel_index = state["sel"]
        pruner.scales = state["scales"]
        pruner.layer_sparsity = state["layer_sparsity"]
        if state["hessians"] is not None:
            pruner.hessians = state["hessians"]
        pruner.owl_ratios = {}
        if state["keeps"] is not None:
            pruner.plan = PlannedKeeps(state["keeps"], pruner.nt)
            for pairs in state["keeps"].values():
                for u, _ in pairs:
                    if hasattr(u, "nt"):
                        u.nt = pruner.nt
        pruner.rows, pruner._buffers, pruner.total_bytes = [], {}, 0
        if parts is None:
            pruner._dry_shard(shard)
            return {"rows": pruner.rows}
        _test_stall(no)
        writer = _PartWriter(view, parts, no)
        try:
            pruner._write_shard(writer, shard)
        except BaseException:
            remove_tree(writer.part)
            raise
        return {"rows": pruner.rows, "part": writer.part, "names": list(writer.weight_map),
                "size": writer.sizes[shard], "elements": writer.elements[shard]}
