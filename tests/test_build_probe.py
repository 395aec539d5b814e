"""setup.py's OpenMP probe goes through the compiler setuptools builds with, configured the same
way: CC, CFLAGS, CPPFLAGS and LDFLAGS from the environment reach it, and a probe that fails gives
the serial-build warning (an error under APRENDER_REQUIRE_OPENMP=1)."""
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig

import pytest

import aprender

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the wrapper is a POSIX shell script")


def _setup_module():
    """setup.py imported as a module: the probe functions without running setup()."""
    spec = importlib.util.spec_from_file_location("aprender_setup_under_test",
                                                  os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _real_cc():
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if cand and shutil.which(shlex.split(cand)[0]):
            return shutil.which(shlex.split(cand)[0])
    pytest.skip("no C compiler (aprender was installed from a wheel)")


def _wrapper(tmp_path, body):
    path = tmp_path / "cc-wrapper"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def build_env(monkeypatch):
    for name in ("APRENDER_DISABLE_OPENMP", "APRENDER_REQUIRE_OPENMP", "CFLAGS", "CPPFLAGS",
                 "LDFLAGS", "LDSHARED", "CPP"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_probe_uses_cc_and_the_flags_from_the_environment(tmp_path, build_env):
    log = tmp_path / "calls.log"
    real = _real_cc()
    cc = _wrapper(tmp_path, f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
                            f'exec {shlex.quote(real)} "$@"\n')
    libdir = tmp_path / "omp-lib"
    libdir.mkdir()
    build_env.setenv("CC", cc)
    build_env.setenv("CFLAGS", "-DAPR_PROBE_CFLAGS=1")
    build_env.setenv("CPPFLAGS", "-DAPR_PROBE_CPPFLAGS=1")
    build_env.setenv("LDFLAGS", f"-L{libdir}")
    setup = _setup_module()
    flags, detail = setup.probe_openmp()

    calls = log.read_text().splitlines()
    compiles = [c for c in calls if " -c " in f" {c} "]
    links = [c for c in calls if " -c " not in f" {c} "]
    assert compiles and links, calls
    compile_omp, link_omp = setup.openmp_flags()
    assert "-DAPR_PROBE_CFLAGS=1" in compiles[0] and "-DAPR_PROBE_CPPFLAGS=1" in compiles[0]
    assert " ".join(compile_omp) in compiles[0]
    assert f"-L{libdir}" in links[0]
    assert " ".join(link_omp) in links[0]
    if aprender.show_config(print_out=False)["openmp"]:
        # this very compiler built the installed kernels with OpenMP: the probe must agree
        assert flags == (compile_omp, link_omp), detail


def test_a_failing_compiler_gives_a_serial_build_warning(tmp_path, build_env):
    build_env.setenv("CC", _wrapper(tmp_path, "echo 'no OpenMP here' >&2\nexit 1\n"))
    setup = _setup_module()
    flags, detail = setup.probe_openmp()
    assert flags is None and "OpenMP probe failed" in detail
    with pytest.warns(UserWarning, match="building WITHOUT OpenMP"):
        assert setup.openmp_or_serial() == ([], [])
    build_env.setenv("APRENDER_REQUIRE_OPENMP", "1")
    with pytest.raises(RuntimeError, match="APRENDER_REQUIRE_OPENMP"):
        setup.openmp_or_serial()


def test_a_missing_compiler_gives_a_serial_build_warning(tmp_path, build_env):
    build_env.setenv("CC", str(tmp_path / "no-such-cc"))
    setup = _setup_module()
    with pytest.warns(UserWarning, match="building WITHOUT OpenMP"):
        assert setup.openmp_or_serial() == ([], [])


def test_disable_openmp_skips_the_probe(tmp_path, build_env):
    log = tmp_path / "calls.log"
    build_env.setenv("CC", _wrapper(tmp_path, f'echo called >> {shlex.quote(str(log))}\nexit 1\n'))
    build_env.setenv("APRENDER_DISABLE_OPENMP", "1")
    setup = _setup_module()
    assert setup.probe_openmp() == (None, "disabled by APRENDER_DISABLE_OPENMP")
    assert not log.exists()


def test_build_jobs(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("APRENDER_BUILD_JOBS", "3")
    assert setup.build_jobs() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("APRENDER_BUILD_JOBS", bad)
        with pytest.raises(RuntimeError, match="APRENDER_BUILD_JOBS"):
            setup.build_jobs()
    monkeypatch.delenv("APRENDER_BUILD_JOBS")
    assert setup.build_jobs() == len(os.sched_getaffinity(0))


def test_build_ext_compiles_in_parallel_unless_told(monkeypatch):
    setup = _setup_module()
    from setuptools import Distribution

    monkeypatch.setenv("APRENDER_BUILD_JOBS", "2")
    cmd = setup.build_ext(Distribution())
    cmd.initialize_options()
    cmd.finalize_options()
    assert cmd.parallel == 2
    cmd = setup.build_ext(Distribution())
    cmd.initialize_options()
    cmd.parallel = 1  # an explicit -j 1 wins
    cmd.finalize_options()
    assert cmd.parallel == 1
