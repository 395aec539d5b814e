"""Shared pytest configuration for the aprender test suite.

Sections (keep each one small and self-contained):

1. hypothesis profiles  -- "dev" (default) and "ci", chosen by the HYPOTHESIS_PROFILE variable
2. slow tests           -- tests marked ``slow`` run only when asked for
3. skips fail in CI     -- with CI set, any skipped test (or module) other than a ``gpu`` one is
                           reported as a failure: a missing oracle or package cannot hide a check
4. launch-independence  -- SIGINT restored to its default when the suite was started with it
                           ignored (a background job, nohup, many CI runners)
5. client               -- a two-worker Dask LocalCluster on loopback without a dashboard,
                           one per test module
"""
import os
import signal

import pytest


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# ----------------------------------------------------------------------------------------------
# 1. hypothesis profiles
# ----------------------------------------------------------------------------------------------
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    settings = None

if settings is not None:
    # dev: quick local runs.  ci: the thorough search (>= 10000 examples per property test).
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.register_profile(
        "ci",
        max_examples=10_000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ----------------------------------------------------------------------------------------------
# 2. slow tests: selected with ``-m slow`` (or any -m expression naming slow), or with CI or
#    APRENDER_RUN_SLOW set; otherwise skipped so that a plain ``pytest`` stays quick.
# ----------------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr", "") or "") or _truthy("CI") \
            or _truthy("APRENDER_RUN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow (or set APRENDER_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# 3. skips fail in CI: a comparison that silently skips (PyTorch or safetensors missing, a
#    module-level importorskip) would let CI pass without the check, so with CI set every skip
#    except those of tests marked ``gpu`` becomes a failure.
# ----------------------------------------------------------------------------------------------
def _skip_reason(report):
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _truthy("CI") and item.get_closest_marker("gpu") is None \
            and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"test {item.nodeid} was skipped while CI is set (in CI only tests "
                           f"marked gpu may skip): {_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _truthy("CI"):
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} was skipped at import while CI is set (a "
                           f"module-level skip would hide all its tests): {_skip_reason(report)}")


# ----------------------------------------------------------------------------------------------
# 4. launch-independence: a process started from a background job (``cmd &`` in a script,
#    nohup, many CI runners) inherits SIGINT as *ignored*, and so does every child it starts:
#    the tests that interrupt a child with SIGINT would then wait for nothing.  Python leaves an
#    inherited SIG_IGN alone, so restore the interpreter's default handler here; a handler (unlike
#    SIG_IGN) is reset to the default disposition on exec, so every child the tests start sees
#    SIGINT as a terminal does, however pytest itself was launched.
# ----------------------------------------------------------------------------------------------
def pytest_configure(config):
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------------------------
# 5. client: a Dask client of a two-process LocalCluster on loopback, with no dashboard (one
#    started in this process would serve its pages on later clusters too), one per test
#    module that asks for it (the Dask tests and the Dask attack catalogue); skipped without Dask.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    timeout = 120  # seconds: every wait is bounded
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None, memory_limit=0,
                                  silence_logs=50) as cluster, \
            distributed.Client(cluster, timeout=timeout) as c:
        c.wait_for_workers(2, timeout=timeout)
        yield c
