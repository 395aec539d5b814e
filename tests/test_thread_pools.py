"""The one thread policy across pools (aprender._threads.limit_pools): BLAS/LAPACK pools (through
threadpoolctl) and torch's intra-op threads are bounded by n_threads inside aprender's calls,
observed from inside those calls, and restored afterwards, also after an error."""
import sys
import types

import numpy as np
import pytest

from aprender import _threads, show_config
from aprender._threads import limit_pools
from aprender.errors import InvalidArgumentError
from aprender.pruning import ActivationStats, calibration as calibration_mod
from aprender.pruning import reconstruct
from aprender.pruning.reconstruct import sparsegpt

threadpoolctl = pytest.importorskip("threadpoolctl")
lapack = pytest.importorskip("scipy.linalg.lapack")


def blas_threads():
    """The thread count of every loaded BLAS library, as threadpoolctl reports it."""
    counts = {i["num_threads"] for i in threadpoolctl.threadpool_info()
              if i["user_api"] == "blas"}
    assert counts, "no BLAS library found: nothing would be observed"
    return counts


class Spy(types.ModuleType):
    """A stand-in for a module: calls named in ``watch`` record the BLAS thread counts (and
    torch's, when torch is imported) at the moment they run, then go through."""

    def __init__(self, inner, watch, seen):
        super().__init__(inner.__name__)
        self._inner, self._watch, self._seen = inner, watch, seen

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if name not in self._watch:
            return fn

        def spy(*args, **kwargs):
            t = sys.modules.get("torch")
            self._seen.append((name, frozenset(blas_threads()),
                               t.get_num_threads() if t is not None else None))
            return fn(*args, **kwargs)
        return spy


def layer(rows=200, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((2 * cols, cols)).astype(np.float32)
    return w, x, x.T @ x


@pytest.fixture
def spies(monkeypatch):
    """Watch LAPACK potrf (SparseGPT's factorisation), SparseGPT's column kernel and
    calibration's XᵀX matmul."""
    seen = []
    real_potrf = lapack.dpotrf

    def potrf(*args, **kwargs):
        seen.append(("dpotrf", frozenset(blas_threads()), None))
        return real_potrf(*args, **kwargs)

    monkeypatch.setattr(lapack, "dpotrf", potrf)
    monkeypatch.setattr(reconstruct, "_k", Spy(reconstruct._k, {"prune_block"}, seen))
    monkeypatch.setattr(calibration_mod, "np", Spy(np, {"matmul"}, seen))
    return seen


def test_limit_pools_sets_nests_and_restores():
    with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
        before = blas_threads()
        assert before == {3}
        with limit_pools(2) as n:
            assert n == 2 and blas_threads() == {2}
            with limit_pools(2, serial_blas=True):
                assert blas_threads() == {1}
                with limit_pools(4):  # nested limits only narrow
                    assert blas_threads() == {1}
                assert blas_threads() == {1}
            assert blas_threads() == {2}
        assert blas_threads() == before
        with pytest.raises(KeyError):
            with limit_pools(1):
                assert blas_threads() == {1}
                raise KeyError("inside")
        assert blas_threads() == before
        assert _threads._blas_cap.get() is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_limit_pools_refuses_a_bad_count(bad):
    with pytest.raises(InvalidArgumentError, match="n_threads"):
        with limit_pools(bad):
            pass


def test_without_threadpoolctl_it_still_works_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    assert not _threads.blas_bounded()
    w, _, h = layer()
    a, ma = sparsegpt(w, h, 0.5, n_threads=1)
    monkeypatch.delitem(sys.modules, "threadpoolctl")
    b, mb = sparsegpt(w, h, 0.5, n_threads=1)
    assert a.tobytes() == b.tobytes() and np.array_equal(ma.keep, mb.keep)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    assert "not bounded" in show_config(print_out=False)["blas_threads"]
    monkeypatch.delitem(sys.modules, "threadpoolctl")
    assert show_config(print_out=False)["blas_threads"] == "bounded by threads"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sparsegpt_bounds_blas_inside_its_calls(spies, n):
    w, _, h = layer()
    with threadpoolctl.threadpool_limits(limits=4, user_api="blas"):
        sparsegpt(w, h, 0.5, n_threads=n)
        assert blas_threads() == {4}  # restored
    potrf = [s for name, s, _ in spies if name == "dpotrf"]
    loop = [s for name, s, _ in spies if name == "prune_block"]
    assert potrf == [frozenset({1})]  # LAPACK: one thread
    assert loop and all(s == frozenset({1}) for s in loop)  # beside the column kernel: 1


def test_sparsegpt_results_identical_for_every_thread_count():
    w, _, h = layer(300, 384, seed=3)
    ref, mref = sparsegpt(w, h, 0.5, n_threads=1)
    for n in (2, 3, None):
        out, m = sparsegpt(w, h, 0.5, n_threads=n)
        assert out.tobytes() == ref.tobytes() and np.array_equal(m.keep, mref.keep)


def test_hessian_update_bounds_blas(spies):
    _, x, h = layer(cols=64)
    exact = x.astype(np.float64).T @ x
    got = []
    for n in (1, 2):
        st = ActivationStats(64, hessian=True)
        spies.clear()
        st.update(x, n_threads=n)
        assert [s for name, s, _ in spies if name == "matmul"] == [frozenset({n})]
        np.testing.assert_allclose(st.hessian, exact, rtol=0, atol=1e-5 * exact.max())
        got.append(st.hessian.copy())
    assert np.array_equal(got[0], got[1])  # the product's split never changes a sum's order


def test_shrink_compensation_bounds_blas(spies):
    from aprender.structured.compensate import compensate_columns

    w, _, h = layer(40, 64)
    kept = np.arange(0, 64, 2)
    a = compensate_columns(w, h, kept, n_threads=1)
    assert [s for name, s, _ in spies if name == "dpotrf"] == [frozenset({1})]
    spies.clear()
    b = compensate_columns(w, h, kept, n_threads=2)
    assert [s for name, s, _ in spies if name == "dpotrf"] == [frozenset({1})]  # LAPACK
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# -- torch ------------------------------------------------------------------------------------
def _model(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))


def test_collect_calibration_bounds_torch_and_blas_and_restores(spies):
    torch = pytest.importorskip("torch")
    from aprender.torch import collect_calibration

    model = _model(torch)
    batches = [torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    before = torch.get_num_threads()
    outer = max(2, before)
    torch.set_num_threads(outer)
    try:
        results = []
        for n in (1, 2):
            spies.clear()
            ctx = collect_calibration(model, batches, hessian=True, progress=False, n_threads=n)
            results.append(ctx)
            assert torch.get_num_threads() == outer  # restored
            mm = [(s, t) for name, s, t in spies if name == "matmul"]
            assert mm and all(s == frozenset({1}) and t == n for s, t in mm)
        assert results[0]["0"] == results[1]["0"] and results[0]["2"] == results[1]["2"]

        class Boom(Exception):
            pass

        def boom(*_):
            assert torch.get_num_threads() == 1
            raise Boom()
        h = model[2].register_forward_pre_hook(boom)
        with pytest.raises(Boom):
            collect_calibration(model, batches, hessian=True, progress=False, n_threads=1)
        h.remove()
        assert torch.get_num_threads() == outer
    finally:
        torch.set_num_threads(before)


def test_prune_sparsegpt_bounds_torch_and_blas_and_restores(spies):
    torch = pytest.importorskip("torch")
    from aprender.torch import collect_calibration, prune_

    model = _model(torch)
    batches = [torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    ctx = collect_calibration(model, batches, hessian=True, progress=False, n_threads=1)
    before = torch.get_num_threads()
    outer = max(2, before)
    torch.set_num_threads(outer)
    try:
        weights = []
        for n in (1, 2):
            m = _model(torch)
            spies.clear()
            prune_(m, 0.5, importance="sparsegpt", calibration=ctx, n_threads=n)
            assert torch.get_num_threads() == outer
            potrf = [s for name, s, _ in spies if name == "dpotrf"]
            assert potrf == [frozenset({1})] * 2  # LAPACK: one thread whatever n
            weights.append([p.detach().numpy().copy() for p in m.parameters()])
        for a, b in zip(*weights):
            assert a.tobytes() == b.tobytes()
        with pytest.raises(Exception):
            prune_(_model(torch), 0.5, importance="sparsegpt", calibration={}, n_threads=1)
        assert torch.get_num_threads() == outer
    finally:
        torch.set_num_threads(before)


def test_calibrate_folder_bounds_torch_and_blas_and_restores(tmp_path, spies, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    try:
        from test_calibrate_stream import samples, tiny
    finally:
        sys.path.pop(0)
    from aprender.hf import calibrate_folder
    from aprender.torch import StatHooks

    tiny(str(tmp_path), "llama")
    seen_torch = []
    real = StatHooks._update

    def update(self, name, st, t, where):
        seen_torch.append(torch.get_num_threads())
        return real(self, name, st, t, where)

    monkeypatch.setattr(StatHooks, "_update", update)
    before = torch.get_num_threads()
    outer = max(2, before)
    torch.set_num_threads(outer)
    try:
        ctxs = []
        for n in (1, 2):
            spies.clear()
            seen_torch.clear()
            ctx, _ = calibrate_folder(str(tmp_path), samples(), hessian=True, n_threads=n)
            ctxs.append(ctx)
            assert torch.get_num_threads() == outer
            assert seen_torch and set(seen_torch) == {n}
            mm = [s for name, s, _ in spies if name == "matmul"]
            assert mm and all(s == frozenset({1}) for s in mm)
        # torch's own forward may round differently with another intra-op thread count (its
        # reductions split): the first block's inputs are the embeddings, identical; later
        # blocks agree to rounding
        assert len(ctxs[0]) == len(ctxs[1]) > 0
        for name in ctxs[0].layer_names:
            a, b = ctxs[0][name], ctxs[1][name]
            assert a.count == b.count
            if name.startswith("model.layers.0.self_attn.") and "o_proj" not in name:
                assert a == b
            np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-4,
                                       atol=1e-5 * float(np.abs(a.hessian).max()))

        def fail(self, name, st, t, where):
            raise RuntimeError("stop")
        monkeypatch.setattr(StatHooks, "_update", fail)
        with pytest.raises(Exception, match="stop"):  # the executor names the block
            calibrate_folder(str(tmp_path), samples(), hessian=True, n_threads=1)
        assert torch.get_num_threads() == outer
    finally:
        torch.set_num_threads(before)


# -- OpenMP's wait policy -------------------------------------------------------------------
def _policy_in_child(env_extra, first=""):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = (f"{first}import os, aprender; print(os.environ.get('OMP_WAIT_POLICY'), "
            "aprender.show_config(print_out=False)['openmp_wait_policy'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_openmp_workers_sleep_by_default_unless_the_user_chose():
    assert _policy_in_child({}) == ["PASSIVE", "PASSIVE"]
    assert _policy_in_child({"OMP_WAIT_POLICY": "active"}) == ["active", "active"]
    assert _policy_in_child({"GOMP_SPINCOUNT": "1000"})[0] == "None"


def test_wait_policy_is_not_set_once_a_runtime_is_loaded():
    pytest.importorskip("torch")
    assert _threads._openmp_loaded() is True  # this process has run our kernels
    env = {}
    assert _threads._passive_wait_by_default(env) is None and env == {}
    assert _policy_in_child({}, first="import torch; ")[0] == "None"


def test_wait_policy_choice_on_an_environment(monkeypatch):
    monkeypatch.setattr(_threads, "_openmp_loaded", lambda: False)
    env = {}
    assert _threads._passive_wait_by_default(env) == "PASSIVE" and env == {
        "OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        assert _threads._passive_wait_by_default(env) is None and env == chosen
