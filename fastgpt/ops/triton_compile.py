"""Compile every GPU configuration of the Triton kernels for sm_80 and sm_90 without a GPU.

Each Triton kernel module listed in KERNEL_MODULES exposes `gpu_compile_cases(capability)`, returning
one CompileCase per (kernel, autotune configuration, dtype) that it would launch on a GPU of that
compute capability. `python -m fastgpt.ops.triton_compile` compiles them all with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))` and prints one JSON record
per case: shared memory used, registers and spilled bytes (from ptxas's log: every case is compiled
afresh, not taken from Triton's cache, so that ptxas runs), whether the PTX holds tensor-core
instructions (and which wgmma shapes), per-thread cp.async or TMA copies, or the error.

A case may take tensor descriptors: its signature then names them as a launch does,
"tensordesc<bf16[1, 1, 128, 128]>" (dtype and block shape).

Each case is compiled as a launch specialises it: pointers are marked divisible by 16 (torch's
allocations are 16-byte aligned), and so is every integer argument, unless the case lists it in
`unaligned` (a size or stride that is not a multiple of 16 in the launch it stands for: V=50257's
logits rows). Without those hints Triton cannot pipeline loads with cp.async, and the shared memory it
reports would be that of an unpipelined kernel, not of the one a GPU runs; with a hint a real launch
would not give, the record would describe a kernel that never runs.

Gluon kernels (`@gluon.jit`, which report is_gluon()) are compiled from Gluon's own AST source, with
the maxnreg their launch sets (CompileCase.max_registers). `python -m fastgpt.ops.triton_compile
MODULE...` compiles only the named modules' cases.

It must run in a process where TRITON_INTERPRET is unset: under the interpreter `@triton.jit` yields
interpreted functions, which cannot be compiled. tests/test_triton_compile.py runs it that way.
"""

import contextlib
import dataclasses
import importlib
import io
import json
import re
import sys

CAPABILITIES = (80, 90)
# Largest shared memory one block may use (opt-in), in bytes: A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ALIGNED_INTEGER_TYPES = ("i32", "i64")
KERNEL_MODULES = (
    "fastgpt.ops.triton_attention",
    "fastgpt.ops.triton_decode",
    "fastgpt.ops.triton_gemm",
    "fastgpt.ops.triton_ffn",
    "fastgpt.ops.triton_layernorm",
    "fastgpt.ops.triton_cross_entropy",
    "fastgpt.ops.gluon_attention",  # sm_90 only: the opt-in Gluon forward
)


@dataclasses.dataclass(frozen=True)
class CompileCase:
    name: str  # readable: kernel, dtype and configuration
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    num_warps: int
    num_stages: int
    tensor_cores: bool  # True when the PTX must hold mma (sm_80) / mma or wgmma (sm_90)
    unaligned: frozenset = frozenset()  # integer arguments that are not multiples of 16 at this launch
    tma: bool = False  # True when the PTX must hold TMA loads (cp.async.bulk.tensor): a descriptor argument
    max_registers: int | None = None  # the launch's maxnreg, where it sets one (warp-specialized kernels)


def compile_case(case, capability):
    """Compile one case; returns a JSON-ready record."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if getattr(case.kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource

    record = {
        "name": case.name,
        "capability": capability,
        "tensor_cores_expected": case.tensor_cores,
        "tma_expected": case.tma,
        "num_stages": case.num_stages,
    }
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(case.kernel.arg_names)
        if case.signature[name].startswith("*")
        or (case.signature[name] in ALIGNED_INTEGER_TYPES and name not in case.unaligned)
    }
    ptxas_log = io.StringIO()  # Triton prints ptxas's log (knobs.nvidia.dump_ptxas_log, set by main)
    try:
        with contextlib.redirect_stdout(ptxas_log):
            compiled = compile(
                ASTSource(
                    fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=aligned
                ),
                target=GPUTarget("cuda", capability, 32),
                options={
                    "num_warps": case.num_warps,
                    "num_stages": case.num_stages,
                    **({"maxnreg": case.max_registers} if case.max_registers else {}),
                },
            )
    except Exception as error:  # noqa: BLE001 - report every failure instead of stopping at the first
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
        return record
    ptx = compiled.asm["ptx"]
    record.update(
        shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT[capability],
        has_mma="mma.sync" in ptx,
        has_wgmma="wgmma" in ptx,
        has_cp_async="cp.async" in ptx,  # per-thread (cp.async.ca/cg) or bulk tensor (TMA) copies
        has_setmaxnreg="setmaxnreg" in ptx,  # registers moved between warp-specialized partitions
        has_mbarrier="mbarrier" in ptx,
        has_tma="cp.async.bulk.tensor" in ptx,
        has_thread_cp_async=re.search(r"cp\.async\.c[ag]\.", ptx) is not None,
        wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        **ptxas_usage(ptxas_log.getvalue()),
    )
    return record


def ptxas_usage(log):
    """Registers per thread and spilled bytes (stores + loads) from ptxas -v's log; empty if absent."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        return {}
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


def all_cases(module_names=KERNEL_MODULES):
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for capability in CAPABILITIES:
            for case in module.gpu_compile_cases(capability):
                yield case, capability


def main():
    """Compiles the cases of the modules named on the command line, or of every module in
    KERNEL_MODULES."""
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    for case, capability in all_cases(sys.argv[1:] or KERNEL_MODULES):
        print(json.dumps(compile_case(case, capability)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
