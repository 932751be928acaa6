"""Builds the compiled extension kdforge._C from csrc/ (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .       # uses the torch already installed; add -v to see compiler output

What gets built:
- CPU kernels always (csrc/**/*.cpp). On x86-64 the files named *_avx2.cpp are compiled a second time with
  -mavx2 -mfma -mf16c and picked at run time when the CPU has AVX2 (see csrc/cpu_capability.h).
- CUDA kernels (csrc/**/*.cu) when torch is a CUDA build and nvcc is found; no GPU is needed to compile them.

Environment:
- KDFORGE_NO_EXT=1       skip the extension; kdforge then runs on its reference and Triton backends.
- KDFORGE_FORCE_CUDA=1   require the CUDA kernels: fail loudly when nvcc or a CUDA build of torch is missing.
  KDFORGE_FORCE_CUDA=0   build the CPU kernels only.
- TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.0;9.0". Unset: the visible GPUs' architectures, or "9.0+PTX"
                         (Hopper SASS plus PTX that newer GPUs JIT-compile) when no GPU is visible, as on CI.
- MAX_JOBS               parallel compile jobs (ninja); CUDA_HOME the toolkit to use when nvcc is not on PATH.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

os.chdir(os.path.dirname(os.path.abspath(__file__)))  # sources are listed relative to the project root

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip().lower() if value is not None and value.strip() else None


def _log(msg: str) -> None:
    print(f"kdforge setup: {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, found before torch.utils.cpp_extension guesses one.

    torch takes dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper script (e.g.
    /usr/local/bin/nvcc -> /usr/local, which has no CUDA headers). Accept only a root with bin/nvcc and
    include/cuda_runtime.h.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _sources(pattern: str) -> list[str]:
    # Relative to the project root: setuptools rejects absolute source paths in editable builds.
    found = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in found)


def _extensions():
    if _flag("KDFORGE_NO_EXT") in ("1", "true", "yes"):
        _log("KDFORGE_NO_EXT=1: not building kdforge._C (kdforge falls back to its other backends)")
        return [], {}

    force_cuda = _flag("KDFORGE_FORCE_CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

    import torch
    from torch.utils import cpp_extension

    torch_has_cuda = torch.version.cuda is not None
    if force_cuda in ("0", "false", "no"):
        with_cuda, why = False, "KDFORGE_FORCE_CUDA=0"
    elif torch_has_cuda and cuda_home:
        with_cuda, why = True, f"torch {torch.__version__} is a CUDA build and nvcc is in {cuda_home}"
    else:
        why = "torch is a CPU-only build" if not torch_has_cuda else "nvcc not found (set CUDA_HOME)"
        if force_cuda in ("1", "true", "yes"):
            raise RuntimeError(f"KDFORGE_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
        with_cuda = False
    _log(f"CUDA kernels {'on' if with_cuda else 'off'}: {why}")

    x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
    cpp = [s for s in _sources("*.cpp") if x86 or not s.endswith("_avx2.cpp")]
    macros = [("KDFORGE_HAVE_AVX2", None)] if x86 else []
    # -g0: no debug info (halves compile time and the .so size); ATen's headers use "#pragma unroll", unknown to g++.
    cxx_flags = ["-O3", "-g0", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
        _log(f"TORCH_CUDA_ARCH_LIST={arch}")
        macros += [("KDFORGE_WITH_CUDA", None), ("KDFORGE_CUDA_ARCH_LIST", f'"{arch}"')]
        ext = cpp_extension.CUDAExtension(
            "kdforge._C",
            cpp + _sources("*.cu"),
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = cpp_extension.CppExtension(
            "kdforge._C", cpp, define_macros=macros, extra_compile_args={"cxx": cxx_flags}
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja, MAX_JOBS) plus per-file ISA flags for the *_avx2.cpp kernel copies."""

        def build_extension(self, ext):
            avx2 = [s for s in ext.sources if s.endswith("_avx2.cpp")]
            if avx2:
                ext.sources = [s for s in ext.sources if s not in avx2]
                flags = dict(ext.extra_compile_args) if isinstance(ext.extra_compile_args, dict) else {}
                flags["cxx"] = list(flags.get("cxx", [])) + ["-mavx2", "-mfma", "-mf16c"]
                macro_args = [(n, v) for n, v in ext.define_macros]
                objects = self.compiler.compile(
                    avx2,
                    output_dir=os.path.join(self.build_temp, "avx2"),
                    macros=macro_args,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=flags,
                    depends=ext.depends,
                )
                # Linked after the baseline objects, so the linker keeps the baseline copy of any inline function
                # both kinds of object define (ODR): AVX2 code then runs only through the dispatched entry points.
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
