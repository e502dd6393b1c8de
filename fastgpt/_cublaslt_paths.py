"""Where cuBLASLt's header and library are, for building the CUDA extension (setup.py), the dev harness
(CMakeLists.txt) and the compile checks (tests/test_cuda_compile.py). Standard library only: setup.py
loads this file by path, before fastgpt or torch can be imported.

Search order (the first with both cublasLt.h and libcublasLt.so*):
  1. $FASTGPT_CUBLASLT_ROOT/{include,lib,lib64};
  2. the `nvidia` namespace package of the wheels torch's CUDA build installs (nvidia/cu13 from the
     `nvidia-cublas` wheel, nvidia/cublas from `nvidia-cublas-cu12`): the library torch itself loads;
  3. the CUDA toolkit ($CUDA_HOME, else the one around nvcc on PATH, else /usr/local/cuda).

Run as a script it prints the include directory, the library directory and the linker name, one a
line (CMakeLists.txt reads them), or nothing when cuBLASLt is not found.
"""

import glob
import importlib.util
import os
import shutil


def _library_name(lib_dir):
    """The name to pass to the linker's -l: 'cublasLt' when the unversioned libcublasLt.so is there
    (a toolkit), else ':libcublasLt.so.<major>' (the wheels ship only the versioned file)."""
    if os.path.exists(os.path.join(lib_dir, "libcublasLt.so")):
        return "cublasLt"
    versioned = sorted(glob.glob(os.path.join(lib_dir, "libcublasLt.so.*")), key=len)
    return ":" + os.path.basename(versioned[0]) if versioned else None


def _candidate_roots():
    root = os.environ.get("FASTGPT_CUBLASLT_ROOT")
    if root:
        yield root
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            for header in sorted(glob.glob(os.path.join(location, "*", "include", "cublasLt.h"))):
                yield os.path.dirname(os.path.dirname(header))
    nvcc = shutil.which("nvcc")
    for home in (
        os.environ.get("CUDA_HOME"),
        nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ):
        if home:
            yield home


def find_cublaslt():
    """(include_dir, lib_dir, link_name) of the first complete cuBLASLt found, or None."""
    for root in _candidate_roots():
        include = os.path.join(root, "include")
        if not os.path.exists(os.path.join(include, "cublasLt.h")):
            continue
        for lib in ("lib", "lib64"):
            lib_dir = os.path.join(root, lib)
            name = _library_name(lib_dir)
            if name is not None:
                return include, lib_dir, name
    return None


def find_cublaslt_header():
    """The directory holding cublasLt.h (library or not), or None: enough for compile-only checks."""
    for root in _candidate_roots():
        if os.path.exists(os.path.join(root, "include", "cublasLt.h")):
            return os.path.join(root, "include")
    return None


if __name__ == "__main__":
    found = find_cublaslt()
    if found is not None:
        print("\n".join(found))
