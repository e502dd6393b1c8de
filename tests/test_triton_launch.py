"""The GPU launch path of every Triton op, dry-run on CPU through Triton's own JIT.

The interpreter tests run the kernels as interpreted functions, one fixed configuration, no
autotuner; the compile checks compile them from hand-written signatures. Neither runs what a GPU
launch runs on the host: the sm_90 configurations and their autotuner (pre-hooks, reset_to_zero,
restore_value, pruning), the tensor descriptors' block shapes, and Triton's JITFunction.run, which
binds the arguments, specialises them (a descriptor's type carries its block shape) and checks the
launch options. Run as a script (without TRITON_INTERPRET), this file drives each op's host code on
CPU tensors with a stand-in sm_90 driver and a jit_cache_hook that records each launch's signature
and constexprs and stops it before compiling; the test runs that script in a subprocess and checks
that every launch got there with descriptors whose blocks are those of its configuration.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS_BY_OP = {
    "attention bf16 D=64": [
        "_attention_forward_kernel",
        "_attention_backward_preprocess_kernel",
        "_attention_backward_fused_kernel",
        "_attention_backward_dq_cast_kernel",
    ],
    "attention bf16 D=128 deterministic": [
        "_attention_forward_kernel",
        "_attention_backward_preprocess_kernel",
        "_attention_backward_dkdv_kernel",
        "_attention_backward_dq_kernel",
    ],
    "attention float32 D=64": [
        "_attention_forward_kernel",
        "_attention_backward_preprocess_kernel",
        "_attention_backward_fused_kernel",
        "_attention_backward_dq_cast_kernel",
    ],
    "gluon bf16 D=128": ["_gluon_attention_forward_kernel", "_gluon_attention_backward_kernel"],
    "decode bf16": ["_decode_partial_kernel", "_decode_combine_kernel"],
    "ffn bf16": ["matmul_kernel", "sum_rows_kernel"],
    "ffn float32": ["matmul_kernel", "sum_rows_kernel"],
    "cross_entropy bf16": ["matmul_kernel", "cross_entropy_rows_kernel", "sum_rows_kernel"],
    "layer_norm bf16": ["layer_norm_forward_kernel", "layer_norm_backward_kernel", "sum_rows_kernel"],
}


def expected_blocks(kernel, constexprs):
    """The block shape each descriptor argument must have at a launch with these constexprs."""
    if kernel == "matmul_kernel":
        m, n, k = (constexprs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        # A_LOAD / B_LOAD: 1 describes the operand itself, 2 its transpose.
        return {
            "a": [m, k] if constexprs["A_LOAD"] == 1 else [k, m],
            "b": [k, n] if constexprs["B_LOAD"] == 1 else [n, k],
        }
    if kernel.startswith("_gluon"):
        return {}  # fixed blocks, checked by the compile cases
    rows, keys, features = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_D"]
    return {
        "Q": [1, 1, rows, features],
        "Out": [1, 1, rows, features],
        "dOut": [1, 1, rows, features],
        "K": [1, 1, keys, features],
        "V": [1, 1, keys, features],
    }


def test_gpu_launch_path_dry_run():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's fastgpt
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    launches = json.loads(result.stdout.splitlines()[-1])
    assert set(launches) == set(KERNELS_BY_OP)
    for op, kernels in KERNELS_BY_OP.items():
        assert sorted({launch["kernel"] for launch in launches[op]}) == sorted(kernels), op
        for launch in launches[op]:
            if launch["descriptors"]:
                blocks = expected_blocks(launch["kernel"], launch["constexprs"])
                for name, block in launch["descriptors"].items():
                    assert name not in blocks or block == blocks[name], (op, launch)
    described = {op for op, ops_launches in launches.items() if any(x["descriptors"] for x in ops_launches)}
    assert described == set(KERNELS_BY_OP) - {"decode bf16", "layer_norm bf16", "attention float32 D=64"}


def dry_run():
    """Drives every op's GPU host path; prints {op: [launch, ...]} as JSON on the last line."""
    import re

    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    def first_candidate_wins(kernel_call, quantiles):
        kernel_call()
        first_candidate_wins.calls += 1
        return [float(first_candidate_wins.calls)] * len(quantiles)

    first_candidate_wins.calls = 0

    class Sm90Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_benchmarker(self):
            return first_candidate_wins

    driver.set_active(Sm90Driver())
    launches = []

    def record_and_skip(*, fn, compile, **_):
        names = fn.jit_function.arg_names
        constexprs = {names[path[0]]: value for path, value in compile["constants"].items() if len(path) == 1}
        descriptors = {
            name: [int(size) for size in re.findall(r"\d+", kind.split("[")[1].split("]")[0])]
            for name, kind in compile["signature"].items()
            if str(kind).startswith("tensordesc")
        }
        launches.append(
            {
                "kernel": fn.name,
                "constexprs": {k: v for k, v in constexprs.items() if isinstance(v, (int, str, bool))},
                "descriptors": descriptors,
            }
        )
        return True  # neither compile nor launch

    knobs.runtime.jit_cache_hook = record_and_skip

    from fastgpt.ops import (
        gluon_attention,
        triton_attention,
        triton_cross_entropy,
        triton_decode,
        triton_ffn,
        triton_gemm,
        triton_layernorm,
    )

    for module in (triton_attention, gluon_attention):  # gluon_attention imported them by name
        module._capability = lambda device_index: 90
        module._multiprocessors = lambda device_index: 132
    triton_decode._device_facts = lambda device_index: (90, 132)
    for module in (triton_gemm, triton_layernorm):  # an H100's SMs, not the CPU's stand-in count
        module.multiprocessor_count = lambda device: 132
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    results = {}

    def record(op, run):
        launches.clear()
        run()
        results[op] = list(launches)

    def attention(dtype, head_dim, deterministic=False):
        q = torch.randn(2, 4, 300, head_dim, dtype=dtype)
        k, v = (torch.randn(2, 2, 333, head_dim, dtype=dtype) for _ in range(2))
        out, lse = triton_attention.attention_forward(q, k, v, 0.1)
        torch.use_deterministic_algorithms(deterministic)
        try:
            triton_attention.attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.1, "tl")
        finally:
            torch.use_deterministic_algorithms(False)

    def gluon():
        q = torch.randn(2, 4, 300, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, 333, 128, dtype=torch.bfloat16) for _ in range(2))
        out, lse = gluon_attention.attention_forward(q, k, v, 0.1)
        dq_acc = torch.zeros(q.shape)
        gluon_attention.attention_backward(
            torch.randn_like(out), q, k, v, lse, lse, dq_acc, torch.empty_like(k), torch.empty_like(v), 0.1
        )

    def decode():
        q = torch.randn(2, 8, 1, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, 4000, 128, dtype=torch.bfloat16) for _ in range(2))
        triton_decode.decode_forward(q, k, v, 0.1)
        triton_decode.decode_forward_with_length(q, k, v, torch.tensor([77]), 0.1)

    def ffn(dtype):
        x, residual = torch.randn(512, 768, dtype=dtype), torch.randn(512, 768, dtype=dtype)
        fc_weight, fc_bias = torch.randn(3072, 768, dtype=dtype), torch.randn(3072, dtype=dtype)
        proj_weight, proj_bias = torch.randn(768, 3072, dtype=dtype), torch.randn(768, dtype=dtype)
        y, h = triton_ffn.ffn_forward(
            x, fc_weight, fc_bias, proj_weight, proj_bias, "gelu_tanh", residual, True
        )
        triton_ffn.ffn_backward(torch.randn_like(y), x, h, fc_weight, proj_weight, "gelu_tanh", True, True)

    def cross_entropy():
        # 6000 tokens: two chunks (the fp32 dW accumulation) of 3008 rows, whose dx GEMM is split-K.
        x, weight = (
            torch.randn(6000, 768, dtype=torch.bfloat16),
            torch.randn(50257, 768, dtype=torch.bfloat16),
        )
        targets = torch.randint(0, 50257, (6000,))
        triton_cross_entropy.cross_entropy_forward(
            x, weight, targets, torch.randn(50257, dtype=x.dtype), -100, "mean", True
        )

    def layer_norm():
        x, weight = torch.randn(4096, 768, dtype=torch.bfloat16), torch.randn(768, dtype=torch.bfloat16)
        out, summed, mean, rstd = triton_layernorm.layer_norm_forward(x, weight, weight, 1e-5, x)
        triton_layernorm.layer_norm_backward(out, summed, weight, mean, rstd, out, True, True)

    record("attention bf16 D=64", lambda: attention(torch.bfloat16, 64))
    record("attention bf16 D=128 deterministic", lambda: attention(torch.bfloat16, 128, deterministic=True))
    record("attention float32 D=64", lambda: attention(torch.float32, 64))
    record("gluon bf16 D=128", gluon)
    record("decode bf16", decode)
    record("ffn bf16", lambda: ffn(torch.bfloat16))
    record("ffn float32", lambda: ffn(torch.float32))
    record("cross_entropy bf16", cross_entropy)
    record("layer_norm bf16", layer_norm)
    print(json.dumps(results))


if __name__ == "__main__":
    dry_run()
