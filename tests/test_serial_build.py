"""aprender built without OpenMP (APRENDER_DISABLE_OPENMP=1) works and gives the same masks."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import numpy as np, aprender
    from aprender import _reference as ref
    from aprender.pruning import (magnitude_mask, generate_nm_mask, generate_global_mask,
                                  generate_block_mask, MagnitudeImportance)
    assert aprender.show_config(print_out=False)["openmp"] is False
    rng = np.random.default_rng(0)
    w = rng.choice(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), (300, 400)).astype(np.float32)
    for nt in (1, 2, 4):
        assert np.array_equal(np.asarray(magnitude_mask(w, 0.4, n_threads=nt)),
                              ref.unstructured_mask(w, 0.4, magnitude=True))
        assert np.array_equal(np.asarray(magnitude_mask(w, 0.4, per_row=True, n_threads=nt)),
                              ref.per_row_mask(w, 0.4, magnitude=True))
        assert np.array_equal(np.asarray(generate_nm_mask(np.abs(w), 2, 4, n_threads=nt)),
                              ref.nm_mask(np.abs(w), 2, 4))
    big = rng.standard_normal(600_000).astype(np.float16)
    assert np.array_equal(np.asarray(magnitude_mask(big, 0.3)),
                          ref.unstructured_mask(big, 0.3, magnitude=True))
    gm = generate_global_mask([np.abs(w), np.abs(big)], 0.5)
    for g, e in zip(gm, ref.global_masks([np.abs(w), np.abs(big)], 0.5)):
        assert np.array_equal(np.asarray(g), e)
    assert np.array_equal(np.asarray(generate_block_mask(np.abs(w), 0.5, (4, 4))),
                          ref.block_mask(np.abs(w), 0.5, (4, 4)))
    s = MagnitudeImportance.l2().compute(w)
    assert s.stats.max == float((w.astype(np.float64) ** 2).max())
    from aprender.pruning import ActivationStats
    x = rng.standard_normal((3000, 70)).astype(np.float32)
    assert np.array_equal(ActivationStats(70).update(x, n_threads=2).sum_squares,
                          ref.sum_squares(x))
    print("serial build ok")
""")


@pytest.mark.slow
def test_serial_build_without_openmp(tmp_path):
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.fail("no C compiler to build the serial variant")
    work = tmp_path / "serial"
    work.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), work / "setup.py")
    shutil.copytree(os.path.join(ROOT, "aprender"), work / "aprender",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.html"))
    env = dict(os.environ, APRENDER_DISABLE_OPENMP="1")
    env.pop("APRENDER_REQUIRE_OPENMP", None)
    env.pop("LD_PRELOAD", None)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "-fopenmp" not in build.stdout
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=work,
                         env=dict(env, PYTHONPATH=str(work)), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "serial build ok" in run.stdout
