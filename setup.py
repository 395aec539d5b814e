"""Build the aprender Cython kernels, with OpenMP when the compiler really supports it.

Environment switches (all optional):

  APRENDER_REQUIRE_OPENMP=1   a failed OpenMP probe is an error instead of a warning (CI sets it)
  APRENDER_DISABLE_OPENMP=1   build serial kernels (prange degrades to a plain loop)
  APRENDER_BOUNDSCHECK=1      compile with Cython bounds/wraparound checks on (debug test runs)
  APRENDER_SANITIZE=address   build with AddressSanitizer (see README, development section)
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))

OPENMP_PROBE = textwrap.dedent(
    r"""
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d %d\n", n, omp_get_max_threads());
        return n >= 1 ? 0 : 1;
    }
    """
)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def probe_openmp():
    """Compile and run a tiny OpenMP program with the real compiler; return the flags or None."""
    if _flag("APRENDER_DISABLE_OPENMP"):
        return None, "disabled by APRENDER_DISABLE_OPENMP"
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        return None, f"compiler {cc[0]!r} not found"
    if sys.platform == "darwin":
        flags = (["-Xpreprocessor", "-fopenmp"], ["-lomp"])
    elif sys.platform == "win32":
        flags = (["/openmp"], [])
    else:
        flags = (["-fopenmp"], ["-fopenmp"])
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as fh:
            fh.write(OPENMP_PROBE)
        try:
            subprocess.run(cc + flags[0] + [src, "-o", exe] + flags[1], check=True,
                           capture_output=True, timeout=120)
            out = subprocess.run([exe], check=True, capture_output=True, timeout=60, text=True)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            return None, f"OpenMP probe failed: {exc} {detail.strip()[:300]}"
    return flags, out.stdout.strip()


def extensions():
    omp_flags, detail = probe_openmp()
    if omp_flags is None:
        msg = f"aprender: building WITHOUT OpenMP ({detail}); kernels will run on one thread"
        if _flag("APRENDER_REQUIRE_OPENMP"):
            raise RuntimeError(msg + " (APRENDER_REQUIRE_OPENMP is set)")
        warnings.warn(msg)
        compile_omp, link_omp = [], []
    else:
        compile_omp, link_omp = omp_flags

    compile_args = ["-O3"] if sys.platform != "win32" else ["/O2"]
    link_args = []
    sanitize = os.environ.get("APRENDER_SANITIZE", "").strip()
    if sanitize:
        compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
        link_args += [f"-fsanitize={sanitize}"]

    kernel_dir = os.path.join("aprender", "_kernels")
    # the shared C headers and declarations: a change to one recompiles every kernel
    shared = sorted(glob.glob(os.path.join(kernel_dir, "*.h"))
                    + glob.glob(os.path.join(kernel_dir, "*.pxd")))
    exts = []
    for pyx in sorted(glob.glob(os.path.join(kernel_dir, "*.pyx"))):
        name = "aprender._kernels." + os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                name,
                [pyx],
                depends=shared,
                include_dirs=[kernel_dir],
                extra_compile_args=compile_args + compile_omp,
                extra_link_args=link_args + link_omp,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )

    from Cython.Build import cythonize

    checks = _flag("APRENDER_BOUNDSCHECK")
    directives = {
        "language_level": 3,
        "boundscheck": checks,
        "wraparound": checks,
        "initializedcheck": checks,
        "cdivision": True,
        "embedsignature": True,
    }
    return cythonize(exts, compiler_directives=directives,
                     compile_time_env={"APRENDER_OPENMP": omp_flags is not None})


setup(ext_modules=extensions())
