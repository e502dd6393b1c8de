"""Where the CUTLASS/CuTe headers are, for building the CUDA extension's Hopper attention kernel
(setup.py, csrc/cuda/attention_fwd_sm90.cu), the dev harness (CMakeLists.txt), the compile checks
(tests/test_cuda_compile.py) and `fastgpt info`. Standard library only: setup.py loads this file by
path, before fastgpt or torch can be imported.

Search order (the first directory holding cute/tensor.hpp and cutlass/version.h):
  1. $FASTGPT_CUTLASS_INCLUDE (for instance headers unpacked where no package registry is reachable);
  2. the `nvidia-cutlass` wheel (pip install nvidia-cutlass), which ships them under
     cutlass_library/source/include. The package is located, not imported.

Run as a script it prints the include directory and the CUTLASS version, one a line, or nothing when
the headers are not found.
"""

import importlib.util
import os
import re


def _has_headers(include):
    return os.path.isfile(os.path.join(include, "cute", "tensor.hpp")) and os.path.isfile(
        os.path.join(include, "cutlass", "version.h")
    )


def find_cutlass_include():
    """The include directory of the CUTLASS and CuTe headers, or None."""
    candidates = []
    explicit = os.environ.get("FASTGPT_CUTLASS_INCLUDE")
    if explicit:
        candidates.append(explicit)
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    return next((os.path.abspath(path) for path in candidates if _has_headers(path)), None)


def cutlass_version(include):
    """'major.minor.patch' from cutlass/version.h under `include`, or None."""
    try:
        with open(os.path.join(include, "cutlass", "version.h")) as file:
            text = file.read()
    except OSError:
        return None
    parts = [re.search(rf"#define CUTLASS_{name}\s+(\d+)", text) for name in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(part.group(1) for part in parts) if all(parts) else None


if __name__ == "__main__":
    found = find_cutlass_include()
    if found is not None:
        print(found)
        print(cutlass_version(found))
