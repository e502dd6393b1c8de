"""The CUDA kernels of csrc/cuda compile for sm_80 and sm_90a with no register spills and no stack frame,
every shipped template instantiation is there, and the attention and GEMM kernels run on tensor cores
(HMMA in the SASS). Also: the fragment layouts check out on the CPU, the csrc/dev harnesses compile and
link against the kernel objects, the cuBLASLt host code of the FFN (csrc/cuda/ffn_cublaslt.cpp)
compiles against cuBLASLt's header and computes the right GEMMs on an emulated cuBLASLt
(csrc/dev/cublaslt_emulator.cpp, on the CPU), and the kernels stay free of torch. The Hopper attention forward
and backward (csrc/cuda/attention_fwd_sm90.cu, attention_bwd_sm90.cu, on CuTe) compile for sm_90a with
every instantiation spill-free and their PTX holding wgmma, TMA (cp.async.bulk.tensor), setmaxnreg and
mbarrier. Needs nvcc, not a GPU; the
cuBLASLt checks also need cublasLt.h (the nvidia-cublas wheel or a CUDA toolkit that has it), the
Hopper checks the CUTLASS headers (the nvidia-cutlass wheel)."""

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

from fastgpt._cublaslt_paths import find_cublaslt, find_cublaslt_header
from fastgpt._cutlass_paths import find_cutlass_include

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
DEV_DIR = ROOT / "csrc" / "dev"
# The Hopper kernels (*_sm90.cu, on CuTe) need the CUTLASS headers and target sm_90a only: they are
# compiled by their own fixture below.
SM90_FILES = sorted(CUDA_DIR.glob("*_sm90.cu"))
KERNEL_FILES = sorted(set(CUDA_DIR.glob("*.cu")) - set(SM90_FILES))
HARNESSES = ("attention_fwd", "attention_bwd", "gemm", "layernorm", "cross_entropy", "ffn_cublaslt")
CUBLASLT_SOURCE = CUDA_DIR / "ffn_cublaslt.cpp"
NO_CUBLASLT = "cublasLt.h is not found: pip install nvidia-cublas (what torch's CUDA build installs)"
ARCHS = ("sm_80", "sm_90a")
GENCODE = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo"]
# Kernels that must be spill-free and on tensor cores (every instantiation of each).
TENSOR_CORE_KERNELS = (
    "attention_forward_kernel",
    "attention_backward_dkdv_kernel",
    "attention_backward_dq_kernel",
    "gemm_kernel",
)
# Instantiations shipped per architecture: name -> count.
EXPECTED_KERNELS = {
    "attention_forward_kernel": 8,  # bfloat16, float16 x head_dim 32, 64, 96, 128
    "attention_backward_dkdv_kernel": 8,
    "attention_backward_dq_kernel": 8,
    "attention_backward_delta_kernel": 2,
    "gemm_kernel": 8,  # bfloat16, float16 x (a, b) K-contiguous or transposed
    "layer_norm_forward_kernel": 4,  # bfloat16, float16 x vectorised, scalar
    "layer_norm_backward_kernel": 4,
    "column_sums_kernel": 4,  # (float32 partials, bfloat16/float16 matrix) x bfloat16, float16 out
    "activation_forward_kernel": 4,  # bfloat16, float16 x 16-byte vectors, single elements
    "activation_backward_kernel": 4,
    "cross_entropy_rows_kernel": 4,  # bfloat16, float16 x row staged in shared memory, streamed
}


def cuobjdump():
    """The cuobjdump that Triton's wheel carries, else one on PATH, else None."""
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        candidate = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    return shutil.which("cuobjdump")


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return dict(zip(names, names))
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


def parse_ptxas(output):
    """One record per kernel and architecture from `-Xptxas -v` output."""
    records, current = [], None
    for line in output.splitlines():
        match = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if match:
            current = {"mangled": match.group(1), "arch": match.group(2)}
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and current is not None:
            current.update(
                stack=int(match.group(1)), spill_stores=int(match.group(2)), spill_loads=int(match.group(3))
            )
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and current is not None:
            current["registers"] = int(match.group(1))
            records.append(current)
            current = None
    names = demangle([r["mangled"] for r in records])
    for record in records:
        record["name"] = names[record["mangled"]]
    return records


def base_name(demangled):
    match = re.search(r"(\w+)<", demangled)
    return match.group(1) if match else demangled


def compile_kernel_file(source, build_dir):
    obj = build_dir / (source.stem + ".o")
    command = [NVCC, *NVCC_FLAGS, *GENCODE, "-Xptxas", "-v", "-c", str(source), "-o", str(obj)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=CUDA_DIR)
    return {
        "source": source.name,
        "returncode": result.returncode,
        "output": result.stdout + result.stderr,
        "object": obj,
    }


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every csrc/cuda/*.cu compiled once for both architectures, in parallel, heaviest first."""
    build_dir = tmp_path_factory.mktemp("cuda_objects")
    order = sorted(KERNEL_FILES, key=lambda path: path.stat().st_size, reverse=True)
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda source: compile_kernel_file(source, build_dir), order))
    return {result["source"]: result for result in results}


@pytest.fixture(scope="module")
def kernels(builds):
    records = []
    for result in builds.values():
        for record in parse_ptxas(result["output"]):
            record["source"] = result["source"]
            records.append(record)
    return records


def test_every_kernel_file_compiles_cleanly(builds):
    assert {path.name for path in KERNEL_FILES} >= {
        "attention_fwd.cu",
        "attention_bwd.cu",
        "gemm.cu",
        "layernorm.cu",
    }
    for name, result in builds.items():
        assert result["returncode"] == 0, f"{name} failed to compile:\n{result['output'][-4000:]}"
        warnings = [line for line in result["output"].splitlines() if "warning" in line.lower()]
        assert not warnings, f"{name} compiles with warnings:\n" + "\n".join(warnings)


def test_every_instantiation_is_compiled_for_both_architectures(kernels):
    for arch in ARCHS:
        counts = {}
        for record in kernels:
            if record["arch"] == arch:
                counts[base_name(record["name"])] = counts.get(base_name(record["name"]), 0) + 1
        assert counts == EXPECTED_KERNELS, f"{arch}: kernels {counts}, expected {EXPECTED_KERNELS}"


def test_no_register_spills_or_stack_frames(kernels):
    assert any(base_name(r["name"]) in TENSOR_CORE_KERNELS for r in kernels)
    offenders = [
        f"{r['arch']} {r['name']}: {r['stack']} B stack, {r['spill_stores']}/{r['spill_loads']} B spilled "
        f"({r['registers']} registers)"
        for r in kernels
        if r["stack"] or r["spill_stores"] or r["spill_loads"]
    ]
    assert not offenders, "register spills or stack frames:\n" + "\n".join(offenders)


def sass_functions(dump):
    """{(arch, mangled function name): SASS text} from cuobjdump -sass output."""
    functions, arch, name, lines = {}, None, None, []

    def flush():
        if name is not None:
            functions[(arch, name)] = "\n".join(lines)

    for line in dump.splitlines():
        match = re.match(r"\s*arch = (sm_\w+)", line)
        if match:
            flush()
            arch, name, lines = match.group(1), None, []
            continue
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            flush()
            name, lines = match.group(1), []
            continue
        lines.append(line)
    flush()
    return functions


def ptx_functions(ptx):
    """{demangled entry name: PTX body} from a .ptx file (mangled names of anonymous namespaces differ
    between compilations, demangled ones do not)."""
    bodies = {
        match.group(1): match.group(2)
        for match in re.finditer(r"\.entry (\S+?)\((.*?)\n}\n", ptx, flags=re.DOTALL)
    }
    names = demangle(list(bodies))
    return {names[mangled]: body for mangled, body in bodies.items()}


def test_tensor_core_instructions(builds, kernels, tmp_path):
    tool = cuobjdump()
    tensor_core_kernels = [r for r in kernels if base_name(r["name"]) in TENSOR_CORE_KERNELS]
    missing = []
    if tool is not None:
        for result in builds.values():
            if not any(r["source"] == result["source"] for r in tensor_core_kernels):
                continue
            dump = subprocess.run(
                [tool, "-sass", str(result["object"])],
                capture_output=True,
                text=True,
                check=True,
            )
            functions = sass_functions(dump.stdout)
            for r in tensor_core_kernels:
                if r["source"] == result["source"]:
                    sass = functions.get((r["arch"], r["mangled"]))
                    if sass is None or "HMMA" not in sass:
                        missing.append(f"{r['arch']} {r['name']}")
    else:  # no cuobjdump: mma.sync in the PTX of each kernel
        for source in ("attention_fwd.cu", "attention_bwd.cu", "gemm.cu"):
            ptx_path = tmp_path / (source + ".ptx")
            subprocess.run(
                [NVCC, *NVCC_FLAGS, "-arch=compute_80", "--ptx", str(CUDA_DIR / source), "-o", str(ptx_path)],
                check=True,
                capture_output=True,
                cwd=CUDA_DIR,
            )
            functions = ptx_functions(ptx_path.read_text())
            for r in tensor_core_kernels:
                if (
                    r["source"] == source
                    and r["arch"] == "sm_80"
                    and "mma.sync" not in functions.get(r["name"], "")
                ):
                    missing.append(f"{r['arch']} {r['name']}")
    assert not missing, "no tensor-core instructions in:\n" + "\n".join(missing)


def test_index_checks_on_cpu(tmp_path):
    """Swizzles, ldmatrix/mma fragment addressing and bank conflicts, checked by running host code."""
    program = tmp_path / "index_checks"
    subprocess.run(
        [NVCC, "-std=c++17", "-O1", str(DEV_DIR / "index_checks.cu"), "-o", str(program)],
        check=True,
        capture_output=True,
        cwd=DEV_DIR,
    )
    result = subprocess.run([str(program)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "all index checks passed" in result.stdout


def compile_against_cublaslt_header(*arguments):
    """nvcc on host C++ (-x c++) against cuBLASLt's header and csrc/, with every warning on: it must
    build without a warning. Skips where the header is not installed."""
    include = find_cublaslt_header()
    if include is None:
        pytest.skip(NO_CUBLASLT)
    command = [
        NVCC,
        "-std=c++17",
        "-x",
        "c++",
        f"-I{include}",
        f"-I{CUDA_DIR.parent}",
        "-Xcompiler",
        "-Wall,-Wextra",
        *arguments,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


def test_cublaslt_host_code_compiles(tmp_path):
    """ffn_cublaslt.cpp is host code (no kernels, so no architecture to target): the host compiler builds
    it with every warning on against cuBLASLt's header, as setup.py's extension and the harness do."""
    compile_against_cublaslt_header("-O3", "-c", str(CUBLASLT_SOURCE), "-o", str(tmp_path / "ffn_cublaslt.o"))


def test_cublaslt_mapping_on_an_emulated_cublaslt(tmp_path):
    """ffn_cublaslt.cpp's GEMMs, run on the CPU against csrc/dev/cublaslt_emulator.cpp's cuBLASLt
    (cublasLt.h's documented semantics on host memory): the FFN forward and backward and the float32
    accumulation match a double reference, with every fused epilogue offered and with each one
    declined (the fallback routes). No GPU, libcublasLt or CUDA runtime is involved."""
    program = tmp_path / "cublaslt_emulator"
    compile_against_cublaslt_header(
        "-O1",
        "--cudart",
        "none",
        str(DEV_DIR / "cublaslt_emulator.cpp"),
        str(CUBLASLT_SOURCE),
        "-o",
        str(program),
    )
    for mode in ([], ["--decline-fused"]):
        result = subprocess.run(
            [str(program), *mode], check=False, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert "all emulated cuBLASLt checks passed" in result.stdout


def test_dev_harnesses_compile_and_link(builds, tmp_path):
    objects = [str(result["object"]) for result in builds.values()]
    cublaslt = find_cublaslt()
    harnesses = [name for name in HARNESSES if cublaslt is not None or name != "ffn_cublaslt"]
    extra = {}
    if cublaslt is not None:
        include, lib_dir, library = cublaslt
        extra["ffn_cublaslt"] = [f"-I{include}", str(CUBLASLT_SOURCE), f"-L{lib_dir}", f"-l{library}"]

    def build(name):
        executable = tmp_path / name
        command = [
            NVCC,
            *NVCC_FLAGS,
            *GENCODE,
            str(DEV_DIR / f"{name}.cu"),
            *objects,
            *extra.get(name, []),
            "-o",
            str(executable),
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=DEV_DIR)
        return name, result.returncode, result.stdout + result.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for name, returncode, output in pool.map(build, harnesses):
            assert returncode == 0, f"csrc/dev/{name}.cu failed to build:\n{output[-4000:]}"
            assert "warning" not in output.lower(), (
                f"csrc/dev/{name}.cu builds with warnings:\n{output[-4000:]}"
            )


def test_launch_header_is_plain_cpp(tmp_path):
    """api.cpp's host compiler can include launch.h (compiled here as C++, not CUDA)."""
    source = tmp_path / "includes_launch_h.cpp"
    source.write_text('#include "launch.h"\nint main() { return fastgpt::cuda::kGemmBlockM > 0 ? 0 : 1; }\n')
    result = subprocess.run(
        [
            NVCC,
            "-std=c++17",
            "-x",
            "c++",
            f"-I{CUDA_DIR}",
            "-c",
            str(source),
            "-o",
            str(tmp_path / "includes_launch_h.o"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_kernels_include_no_torch():
    for path in sorted(CUDA_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
            torch_like = [name for name in includes if name.split("/")[0] in ("torch", "ATen", "c10")]
            assert not torch_like, f"{path.name} includes {torch_like}; only csrc/cuda/api_cuda.inc may"


def test_torch_facing_cuda_section_compiles(tmp_path):
    """csrc/api.cpp with its CUDA section (csrc/cuda/api_cuda.inc: the CUDA kernels registered under the
    ops' one schema each) passes the host compiler's syntax and type checks against this torch's headers,
    so a schema or signature mismatch shows here, not first on a GPU machine. The CPU wheel lacks one
    generated header of c10/cuda (its build's macros); an empty stand-in takes its place. The FFN's
    cuBLASLt path takes torch's cuBLASLt handle from ATen/cuda/CUDAContextLight.h, which includes
    cuBLAS (from the nvidia-cublas wheel: cublasLt.h and cublas_v2.h) and, for handles declared beside
    it, cuSPARSE and cuSOLVER: stand-ins declare the two handle types it names from those. Compiled as
    setup.py builds it with the CUTLASS headers found (attention_forward then also routes to the Hopper
    kernel under FASTGPT_CUDA_ATTENTION=sm90; without them that branch is left out)."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    cublaslt_include = find_cublaslt_header()
    if cublaslt_include is None:
        pytest.skip(NO_CUBLASLT)
    stubs = {
        "c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n",
        "cusparse.h": "#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\n",
        "cusolverDn.h": "#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    }
    for name, text in stubs.items():
        stub = tmp_path / name
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(text)
    candidates = [os.environ.get("CUDA_HOME"), pathlib.Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    cuda_include = next(
        (
            pathlib.Path(c) / "include"
            for c in candidates
            if c and (pathlib.Path(c) / "include" / "cuda_runtime.h").exists()
        ),
        None,
    )
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's headers (cuda_runtime.h) are not found")
    python_include = sysconfig.get_paths()["include"]
    includes = [
        tmp_path,
        *cpp_extension.include_paths(),
        python_include,
        cuda_include,
        cublaslt_include,
        ROOT / "csrc",
    ]
    command = [
        shutil.which("c++") or "g++",
        "-std=c++20",
        "-fsyntax-only",
        "-DFASTGPT_WITH_CUDA",
        "-DFASTGPT_WITH_SM90_ATTENTION",
        *(f"-I{path}" for path in includes),
        str(ROOT / "csrc" / "api.cpp"),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"torch {torch.__version__}: " + result.stderr[-4000:]


# ---- The Hopper attention kernels (csrc/cuda/attention_fwd_sm90.cu, attention_bwd_sm90.cu) ---------

NO_CUTLASS = "the CUTLASS/CuTe headers are not found: pip install nvidia-cutlass (make cuda-compile-deps)"
SM90_SOURCES = ("attention_fwd_sm90.cu", "attention_bwd_sm90.cu")
# The warp-specialised kernel of each file: instantiated for bfloat16, float16 x head_dim 64, 128.
SM90_KERNELS = {
    "attention_fwd_sm90.cu": "attention_forward_sm90_kernel",
    "attention_bwd_sm90.cu": "attention_backward_sm90_kernel",
}
SM90_INSTANTIATIONS = 4
# Every kernel each file holds: name -> instantiations (the backward's delta/lse/zeroing pass and its dq
# conversion run beside the main kernel).
SM90_EXPECTED_KERNELS = {
    "attention_fwd_sm90.cu": {"attention_forward_sm90_kernel": 4},
    "attention_bwd_sm90.cu": {
        "attention_backward_sm90_kernel": 4,
        "attention_backward_sm90_prepare_kernel": 4,
        "attention_backward_sm90_convert_kernel": 4,
    },
}
# What every instantiation's PTX must hold: warpgroup MMAs, TMA tile loads, register reallocation
# between producer and consumers, and the mbarrier ring. The forward also stores O by TMA; the backward
# also loads each block's lse and delta rows by bulk copy, adds each step's dQ to the float32
# accumulator by TMA reduce-add from a shared-memory tile, and stores dK and dV by TMA: no global
# atomics and no global stores from registers.
SM90_PTX_INSTRUCTIONS = (
    "wgmma.mma_async",
    "cp.async.bulk.tensor",
    "setmaxnreg.dec",
    "setmaxnreg.inc",
    "mbarrier.try_wait",
    "mbarrier.arrive.expect_tx",
)
SM90_PTX_EXTRA = {
    "attention_fwd_sm90.cu": ("cp.async.bulk.tensor.4d.global.shared",),
    "attention_bwd_sm90.cu": (
        "cp.async.bulk.shared::cluster.global",
        "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add",
        "cp.async.bulk.tensor.4d.global.shared",
    ),
}
SM90_PTX_ABSENT = {
    "attention_fwd_sm90.cu": (),
    "attention_bwd_sm90.cu": ("atom.global", "red.global", "st.global"),
}
# wgmma shapes in the SASS: the forward's 128-wide S and O tiles; the backward's S^T, dP^T and dQ
# (64 x 64 per warpgroup at head_dim 128, 64 x 32 at 64) and dK, dV (64 x head_dim).
SM90_SASS_HGMMA = {
    "attention_fwd_sm90.cu": {64: ("HGMMA.64x128x16.F32",), 128: ("HGMMA.64x128x16.F32",)},
    "attention_bwd_sm90.cu": {
        64: ("HGMMA.64x64x16.F32", "HGMMA.64x32x16.F32"),
        128: ("HGMMA.64x64x16.F32", "HGMMA.64x128x16.F32"),
    },
}
# setup.py's nvcc flags for the extension, with the half/bfloat16 macros torch's CUDAExtension adds,
# so that this compile is the extension's.
SM90_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def compile_sm90_file(source, build_dir, include):
    """One nvcc call for one *_sm90.cu, sm_90a only, PTX kept."""
    keep_dir = build_dir / source.stem
    keep_dir.mkdir()
    obj = build_dir / (source.stem + ".o")
    command = [
        NVCC,
        *SM90_FLAGS,
        f"-I{include}",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-Xptxas",
        "-v",
        "-keep",
        f"-keep-dir={keep_dir}",
        "-c",
        str(source),
        "-o",
        str(obj),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=CUDA_DIR)
    ptx = sorted(keep_dir.glob("*.ptx"))
    return {
        "returncode": result.returncode,
        "output": result.stdout + result.stderr,
        "object": obj,
        "ptx": ptx[0].read_text() if ptx else "",
    }


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory):
    """Each *_sm90.cu compiled once, for sm_90a with its PTX kept, the two files in parallel (CuTe
    compiles are slow: about 45 s of CPU each for four instantiations). The launchers static_assert
    their shared storage against the 227 KB an H100/H200 block may opt into, so these compiles also
    prove that each tile configuration fits."""
    include = find_cutlass_include()
    if include is None:
        pytest.skip(NO_CUTLASS)
    assert {path.name for path in SM90_FILES} == set(SM90_SOURCES)
    build_dir = tmp_path_factory.mktemp("sm90_objects")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(SM90_FILES)) as pool:
        results = list(pool.map(lambda source: compile_sm90_file(source, build_dir, include), SM90_FILES))
    return {source.name: result for source, result in zip(SM90_FILES, results)}


@pytest.fixture(scope="module")
def sm90_kernels(sm90_builds):
    """{file: ptxas records of its kernels}."""
    records = {}
    for name, build in sm90_builds.items():
        assert build["returncode"] == 0, f"{name} failed to compile:\n" + build["output"][-4000:]
        records[name] = parse_ptxas(build["output"])
    return records


@pytest.mark.parametrize("source", SM90_SOURCES)
def test_sm90_attention_compiles_cleanly(sm90_builds, source):
    build = sm90_builds[source]
    assert build["returncode"] == 0, build["output"][-4000:]
    warnings = [line for line in build["output"].splitlines() if "warning" in line.lower()]
    assert not warnings, f"{source} compiles with warnings:\n" + "\n".join(warnings)


@pytest.mark.parametrize("source", SM90_SOURCES)
def test_sm90_every_instantiation_is_spill_free(sm90_kernels, source):
    records = sm90_kernels[source]
    counts = {}
    for r in records:
        counts[base_name(r["name"])] = counts.get(base_name(r["name"]), 0) + 1
    assert counts == SM90_EXPECTED_KERNELS[source], counts
    assert {r["arch"] for r in records} == {"sm_90a"}
    main = [r for r in records if base_name(r["name"]) == SM90_KERNELS[source]]
    for dtype in ("bfloat16_t", "half_t"):
        for head_dim in (64, 128):
            assert any(dtype in r["name"] and f", {head_dim}>" in r["name"] for r in main), (dtype, head_dim)
    offenders = [
        f"{r['name']}: {r['stack']} B stack, {r['spill_stores']}/{r['spill_loads']} B spilled"
        for r in records
        if r["stack"] or r["spill_stores"] or r["spill_loads"]
    ]
    assert not offenders, "register spills or stack frames:\n" + "\n".join(offenders)


def ptx_entries(ptx):
    """{demangled entry name: its PTX up to the next entry}. Unlike ptx_functions this does not stop at
    the first closing brace of a line of its own, which CuTe's inline-asm blocks also end with."""
    starts = [match for match in re.finditer(r"\.entry (\S+?)\(", ptx)]
    bodies = {
        match.group(1): ptx[match.start() : (starts[i + 1].start() if i + 1 < len(starts) else len(ptx))]
        for i, match in enumerate(starts)
    }
    names = demangle(list(bodies))
    return {names[mangled]: body for mangled, body in bodies.items()}


@pytest.mark.parametrize("source", SM90_SOURCES)
def test_sm90_ptx_has_wgmma_tma_setmaxnreg_and_mbarrier(sm90_builds, sm90_kernels, source):
    kernel = SM90_KERNELS[source]
    functions = ptx_entries(sm90_builds[source]["ptx"])
    assert len([name for name in functions if kernel in name]) == SM90_INSTANTIATIONS, list(functions)
    for name, body in functions.items():
        if kernel in name:
            expected = SM90_PTX_INSTRUCTIONS + SM90_PTX_EXTRA[source]
            missing = [instruction for instruction in expected if instruction not in body]
            assert not missing, f"{name} lacks {missing}"
            present = [instruction for instruction in SM90_PTX_ABSENT[source] if instruction in body]
            assert not present, f"{name} holds {present}"


@pytest.mark.parametrize("source", SM90_SOURCES)
def test_sm90_sass_runs_hgmma(sm90_builds, sm90_kernels, source):
    """wgmma becomes HGMMA of the tile shapes the kernel asks for in the SASS, and setmaxnreg USETMAXREG."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not found (Triton's wheel carries one)")
    dump = subprocess.run(
        [tool, "-sass", str(sm90_builds[source]["object"])], capture_output=True, text=True, check=True
    )
    functions = sass_functions(dump.stdout)
    main = [r for r in sm90_kernels[source] if base_name(r["name"]) == SM90_KERNELS[source]]
    assert len(main) == SM90_INSTANTIATIONS
    for record in main:
        sass = functions[(record["arch"], record["mangled"])]
        head_dim = 64 if ", 64>" in record["name"] else 128
        for shape in SM90_SASS_HGMMA[source][head_dim]:
            assert shape in sass, (record["name"], shape)
        assert "USETMAXREG" in sass, record["name"]


def test_sm90_harness_compiles_and_links(sm90_builds, builds, tmp_path):
    """csrc/dev/attention_sm90.cu links the sm_90a kernels beside the sm_80 ones they are timed against."""
    for name, build in sm90_builds.items():
        assert build["returncode"] == 0, f"{name}: " + build["output"][-4000:]
    objects = [str(result["object"]) for result in builds.values()]
    command = [
        NVCC,
        *NVCC_FLAGS,
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        str(DEV_DIR / "attention_sm90.cu"),
        *(str(build["object"]) for build in sm90_builds.values()),
        *objects,
        "-o",
        str(tmp_path / "attention_sm90"),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=DEV_DIR)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stderr[-4000:]


def test_sm90_register_layouts_on_cpu(tmp_path):
    """csrc/dev/sm90_layout_checks.cu runs CuTe's layout functions on the host for every instantiation:
    the rows the softmax reduces over, the quads it shuffles across, and P read in place as the PV
    wgmma's A operand are where the forward assumes them; the backward's per-query columns of S^T, P^T
    and dS^T as the dK/dV wgmma's A operand, the register pairs it stores as one word, its transposed
    shared-memory views, and its dQ staging tile for the TMA reduce-add (addresses, bank spread)
    likewise."""
    include = find_cutlass_include()
    if include is None:
        pytest.skip(NO_CUTLASS)
    program = tmp_path / "sm90_layout_checks"
    subprocess.run(
        [
            NVCC,
            "-std=c++17",
            "-O1",
            "--expt-relaxed-constexpr",
            f"-I{include}",
            str(DEV_DIR / "sm90_layout_checks.cu"),
            "-o",
            str(program),
        ],
        check=True,
        capture_output=True,
        cwd=DEV_DIR,
    )
    result = subprocess.run([str(program)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "all sm90 layout checks passed" in result.stdout
