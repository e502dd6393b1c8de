"""Build script: the pure-Python package plus the optional compiled extension fastgpt._C.

fastgpt._C holds the C++ CPU kernels (csrc/cpu, OpenMP) behind the torch operators of csrc/api.cpp
(the `cpu` backend). When a CUDA-enabled torch and nvcc are both present it is built as a
CUDAExtension that also compiles csrc/cuda/*.cu (the `cuda` backend). Environment:

  FASTGPT_CUDA=auto|0|1   compile the CUDA kernels when possible (default), never, or always (fail if
                          CUDA torch or nvcc is missing)
  FASTGPT_CUBLASLT_ROOT   where cuBLASLt's include/ and lib/ are, when not in the `nvidia` wheels that
                          torch's CUDA build installs nor in the CUDA toolkit (fastgpt/_cublaslt_paths.py)
  FASTGPT_CUTLASS_INCLUDE where the CUTLASS/CuTe headers are, when the `nvidia-cutlass` wheel is not
                          installed (fastgpt/_cutlass_paths.py)
  TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0a" (9.0 is built as 9.0a when CUTLASS is
                          found: the Hopper attention kernel needs the architecture-specific target;
                          a list without 9.0 builds no Hopper kernel)

The CUDA extension's Hopper attention forward (csrc/cuda/attention_fwd_sm90.cu) is written on CuTe,
whose headers come from the `nvidia-cutlass` wheel (`pip install nvidia-cutlass`, 6 MB, headers only
as far as this build is concerned). Without them the CUDA extension is built without that kernel
(the sm_80 attention kernel serves every GPU) and setup.py says so; a CPU-only build never needs them.
  MAX_JOBS                parallel compile jobs

No -march flag is used: the CPU kernels are compiled for AVX-512, AVX2 and the baseline and pick one
at run time, so a wheel built here runs on any x86-64 CPU.

Install with `pip install --no-build-isolation -e .` (or `.`) so the build sees the installed torch.
If the extension cannot be built (no torch at build time, no C++ compiler, a compile error), the
install still succeeds as pure Python: the reason is printed and written to
fastgpt/_C_build_error.txt, which `fastgpt info` shows as why the cpu and cuda backends are missing.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "fastgpt._C"
BUILD_ERROR_FILE = "_C_build_error.txt"
CPU_FLAGS = ["-O3", "-ffp-contract=fast"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def relative_sources(pattern):
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


CPU_SOURCES = ["csrc/api.cpp", "csrc/autograd.cpp", *relative_sources("csrc/cpu/*.cpp")]
# The cuBLASLt host code (csrc/cuda/ffn_cublaslt.cpp) is plain C++ for the host compiler. Sources
# named *_sm90.cu are written on CuTe and compiled only when its headers are found.
SM90_SOURCES = relative_sources("csrc/cuda/*_sm90.cu")
CUDA_SOURCES = [
    path for path in relative_sources("csrc/cuda/*.cu") + relative_sources("csrc/cuda/*.cpp") if path not in SM90_SOURCES
]


def cuda_mode():
    mode = os.environ.get("FASTGPT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: FASTGPT_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def find_cublaslt():
    """(include_dir, lib_dir, link_name) of cuBLASLt, from fastgpt/_cublaslt_paths.py loaded by path
    (fastgpt itself is not importable while it is being built)."""
    import importlib.util

    path = os.path.join(ROOT, "fastgpt", "_cublaslt_paths.py")
    spec = importlib.util.spec_from_file_location("_fastgpt_cublaslt_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cublaslt()


def find_cutlass_include():
    """The CUTLASS/CuTe include directory from fastgpt/_cutlass_paths.py loaded by path, or None."""
    import importlib.util

    path = os.path.join(ROOT, "fastgpt", "_cutlass_paths.py")
    spec = importlib.util.spec_from_file_location("_fastgpt_cutlass_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cutlass_include()


def hopper_arch_list(arch_list):
    """TORCH_CUDA_ARCH_LIST with 9.0 as 9.0a: wgmma, TMA and setmaxnreg exist only in the
    architecture-specific target, and its code runs on every compute capability 9.0 GPU."""
    return ";".join("9.0a" + arch[3:] if arch.startswith("9.0") and not arch.startswith("9.0a") else arch
                    for arch in arch_list.replace(" ", ";").split(";") if arch)


def builds_hopper(arch_list):
    """Whether TORCH_CUDA_ARCH_LIST compiles a compute capability 9.0 image (9.0, 9.0a, 9.0+PTX). The
    Hopper attention kernel exists only there: without one, a Hopper GPU would JIT the other
    architectures' PTX, in which the kernel is a stub that traps."""
    return any(arch.startswith("9.0") for arch in arch_list.replace(" ", ";").split(";"))


def openmp_flags():
    """-fopenmp for GCC/clang on Linux; Apple's clang has no OpenMP, and the kernels then run serially."""
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def torch_extension():
    """(extension, build_ext base class, None), or (placeholder, setuptools build_ext, reason) when
    torch cannot be imported at build time."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # noqa: BLE001 (a missing or broken torch raises many kinds): pure Python
        if cuda_mode() == "1":
            sys.exit(
                f"setup.py: FASTGPT_CUDA=1 but torch cannot be imported ({type(error).__name__}: {error})"
            )
        # The usual cause: pip builds in an isolated environment, which has no torch unless told otherwise.
        reason = (
            f"torch was not importable when fastgpt was built ({type(error).__name__}: {error}). "
            "A plain `pip install` builds in an isolated environment without torch: install torch first, "
            "then reinstall with `pip install --no-build-isolation .` (or the same with a git URL)"
        )
        return Extension(EXTENSION_NAME, sources=CPU_SOURCES), build_ext, reason

    mode = cuda_mode()
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not cuda_possible:
        sys.exit(
            "setup.py: FASTGPT_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, nvcc home={cpp_extension.CUDA_HOME}"
        )
    with_cuda = bool(CUDA_SOURCES) and cuda_possible and mode != "0"
    common = {
        "name": EXTENSION_NAME,
        "include_dirs": [os.path.join(ROOT, "csrc")],
        "extra_link_args": openmp_flags(),
    }
    cublaslt = find_cublaslt() if with_cuda else None
    if with_cuda and cublaslt is None:
        message = (
            "the CUDA backend's FFN needs cuBLASLt (cublasLt.h and libcublasLt.so*), found neither in the "
            "`nvidia` wheels (pip install nvidia-cublas), the CUDA toolkit, nor $FASTGPT_CUBLASLT_ROOT"
        )
        if mode == "1":
            sys.exit(f"setup.py: FASTGPT_CUDA=1 but {message}")
        print(f"setup.py: building without the cuda backend: {message}", file=sys.stderr)
        with_cuda = False
    cutlass_include = find_cutlass_include() if with_cuda else None
    if with_cuda and cutlass_include is None:
        print(
            "setup.py: building the cuda backend without its Hopper attention kernel: the CUTLASS/CuTe "
            "headers are not found (pip install nvidia-cutlass, or set FASTGPT_CUTLASS_INCLUDE)",
            file=sys.stderr,
        )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        if cutlass_include is not None and not builds_hopper(os.environ["TORCH_CUDA_ARCH_LIST"]):
            print(
                "setup.py: building the cuda backend without its Hopper attention kernel: "
                f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} has no 9.0 entry, and a "
                "Hopper GPU would run the kernel's stub",
                file=sys.stderr,
            )
            cutlass_include = None
        cublaslt_include, cublaslt_lib, cublaslt_name = cublaslt
        macros = [("FASTGPT_WITH_CUDA", None)]
        sources = CPU_SOURCES + CUDA_SOURCES
        include_dirs = [*common["include_dirs"], cublaslt_include]
        if cutlass_include is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
            macros.append(("FASTGPT_WITH_SM90_ATTENTION", None))
            sources += SM90_SOURCES
            include_dirs.append(cutlass_include)
        extension = cpp_extension.CUDAExtension(
            sources=sources,
            define_macros=macros,
            extra_compile_args={"cxx": CPU_FLAGS + openmp_flags(), "nvcc": NVCC_FLAGS},
            name=EXTENSION_NAME,
            include_dirs=include_dirs,
            library_dirs=[cublaslt_lib],
            libraries=[cublaslt_name],
            # The rpath finds the library where it was linked; when torch has already loaded its own
            # libcublasLt of the same soname, the loader reuses that one.
            extra_link_args=[*common["extra_link_args"], f"-Wl,-rpath,{cublaslt_lib}"],
        )
    else:
        extension = cpp_extension.CppExtension(
            sources=CPU_SOURCES, extra_compile_args={"cxx": CPU_FLAGS + openmp_flags()}, **common
        )
    return extension, cpp_extension.BuildExtension, None


EXTENSION, BUILD_BASE, TORCH_MISSING = torch_extension()


class OptionalBuildExtension(BUILD_BASE):
    """Builds fastgpt._C if it can; otherwise warns, records why, and lets the install go on."""

    def run(self):
        reason = TORCH_MISSING
        if reason is None:
            try:
                super().run()
            except (Exception, SystemExit) as error:  # compilers and ninja fail in many ways
                if cuda_mode() == "1":
                    raise
                reason = (
                    f"building fastgpt._C failed ({type(error).__name__}: {error}); it needs a C++17 compiler "
                    "with OpenMP: `pip install -v --no-build-isolation .` shows the compiler output"
                )
        self.record_build_status(reason)

    def record_build_status(self, reason):
        """Writes the failure reason where fastgpt will be imported from, next to where _C would be
        (the build tree for wheels, the source tree too for editable and in-place builds), and removes
        a stale one after a successful build. A failed build also removes any _C left by an earlier
        build there, which no longer matches the sources."""
        directories = {os.path.dirname(self.get_ext_fullpath(EXTENSION_NAME))}
        if self.inplace or getattr(self, "editable_mode", False):
            directories.add(os.path.join(ROOT, "fastgpt"))
        if reason is not None:
            # pip shows a successful build's output only with -v; the reason also goes into the package,
            # where `fastgpt info` and the import error of the cpu backend repeat it.
            banner = "=" * 78
            print(
                f"{banner}\nWARNING: fastgpt is installed WITHOUT its compiled kernels (the cpu and cuda "
                f"backends).\n{reason}\nOn CPU tensors, backend='auto' runs the slower `reference` backend "
                f"instead; `python -m fastgpt info` shows this reason again.\n{banner}",
                file=sys.stderr,
                flush=True,
            )
        for directory in directories:
            path = os.path.join(directory, BUILD_ERROR_FILE)
            if reason is None:
                if os.path.exists(path):
                    os.remove(path)
                continue
            for stale in glob.glob(os.path.join(directory, "_C.*")):
                os.remove(stale)
            os.makedirs(directory, exist_ok=True)
            with open(path, "w") as file:
                file.write(reason + "\n")


setup(ext_modules=[EXTENSION], cmdclass={"build_ext": OptionalBuildExtension})
