"""Build the aprender Cython kernels, with OpenMP when the compiler really supports it.

Environment switches (all optional):

  APRENDER_REQUIRE_OPENMP=1   a failed OpenMP probe is an error instead of a warning (CI sets it)
  APRENDER_DISABLE_OPENMP=1   build serial kernels (prange degrades to a plain loop)
  APRENDER_BOUNDSCHECK=1      compile with Cython bounds/wraparound checks on (debug test runs)
  APRENDER_SANITIZE=address   build with AddressSanitizer (see docs/internals.md, Development)
  APRENDER_BUILD_JOBS=N       compile N extensions at once (default: one per CPU; pip gives no -j)
"""
import glob
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

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


def openmp_flags():
    """(compile flags, link flags) that turn OpenMP on for this platform's compiler."""
    if sys.platform == "darwin":  # Apple clang: libomp (e.g. Homebrew's, via CPPFLAGS/LDFLAGS)
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    if sys.platform == "win32":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def probe_openmp():
    """Compile, link and run a tiny OpenMP program with the compiler that setuptools builds the
    extensions with, configured the same way (CC, CFLAGS, CPPFLAGS and LDFLAGS from the
    environment honoured).  Returns (flags, probe output) or (None, why it failed)."""
    if _flag("APRENDER_DISABLE_OPENMP"):
        return None, "disabled by APRENDER_DISABLE_OPENMP"
    from setuptools.command.build_ext import customize_compiler, new_compiler
    from setuptools.errors import CCompilerError, ExecError, PlatformError

    flags = openmp_flags()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as fh:
            fh.write(OPENMP_PROBE)
        try:
            cc = new_compiler()
            customize_compiler(cc)
            # the compiler's executable linker omits LDFLAGS (only the shared-object linker that
            # builds the extensions has them), so pass them here: -L/-rpath for a libomp
            ldflags = shlex.split(os.environ.get("LDFLAGS", "")) if cc.compiler_type == "unix" \
                else []
            objects = cc.compile([src], output_dir=tmp, extra_postargs=flags[0])
            cc.link_executable(objects, "probe", output_dir=tmp, extra_preargs=ldflags,
                               extra_postargs=flags[1])
            exe = os.path.join(tmp, cc.executable_filename("probe"))
            out = subprocess.run([exe], check=True, capture_output=True, timeout=60, text=True)
        except (CCompilerError, ExecError, PlatformError, OSError,
                subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or ""
            return None, f"OpenMP probe failed: {exc} {detail.strip()[:300]}".strip()
    return flags, out.stdout.strip()


def openmp_or_serial():
    """The OpenMP (compile, link) flags, or ([], []) with a warning when the probe fails (an error
    under APRENDER_REQUIRE_OPENMP=1)."""
    omp_flags, detail = probe_openmp()
    if omp_flags is None:
        msg = f"aprender: building WITHOUT OpenMP ({detail}); kernels will run on one thread"
        if _flag("APRENDER_REQUIRE_OPENMP"):
            raise RuntimeError(msg + " (APRENDER_REQUIRE_OPENMP is set)")
        warnings.warn(msg)
        return [], []
    return omp_flags


def extensions():
    compile_omp, link_omp = openmp_or_serial()

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
    return cythonize(exts, compiler_directives=directives, nthreads=build_jobs())


def build_jobs():
    """How many extensions to compile at once: APRENDER_BUILD_JOBS, else one per usable CPU."""
    text = os.environ.get("APRENDER_BUILD_JOBS", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise RuntimeError(f"APRENDER_BUILD_JOBS must be a whole number >= 1, got {text!r}")
        return int(text)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class build_ext(_build_ext):
    """build_ext that compiles the extensions in parallel: pip never passes -j, and the kernels
    take minutes to compile one after another.  An explicit -j/--parallel still wins."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = build_jobs()


# pip (setuptools.build_meta) and `python setup.py ...` both run this file as __main__; the tests
# import it for the probe without building anything
if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
