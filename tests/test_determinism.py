"""Determinism: repeated calls on the same inputs give bitwise-identical outputs and gradients.

Every op on every backend here (reference, cpu and triton under the interpreter on CPU; triton and
cuda in the gpu-marked tests), at shapes whose reductions span several blocks, programs and threads:
attention with GQA (dK/dV summed over a group of query heads) over several key blocks; FFN and
cross-entropy bias and weight gradients summed over several row tiles and chunks; LayerNorm weight
gradients summed over several backward programs. Then a whole GPT training step (forward, backward,
AdamW step) on each backend. Every test here runs under torch.use_deterministic_algorithms(True)
(warn_only, so torch's own ops without a deterministic kernel only warn), as a user who wants
repeatable results would: the Triton attention backward then takes its fixed-order kernels instead of
the fused one, which adds dQ up with atomics. The reductions run in a fixed order.
(Thread-count independence of the cpu backend is tested in test_cpu_attention.py / test_cpu_ops.py.)
"""

import copy

import pytest
import torch
from deterministic import deterministic_algorithms

import fastgpt
from fastgpt.nn import GPT, GPTConfig

CPU_BACKENDS = [b for b in fastgpt.available_backends() if b in ("reference", "cpu", "triton")]
if torch.cuda.is_available():  # on a GPU machine triton runs on CUDA tensors, in the gpu tests below
    CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]
GPU_BACKENDS = ["triton", "cuda"]
REPEATS = 2


@pytest.fixture(autouse=True)
def deterministic():
    with deterministic_algorithms():
        yield


def attention_case(device, dtype):
    q = torch.randn(2, 6, 33, 24, device=device, dtype=dtype)  # (B, H, Tq, D): 3 query heads per kv head
    k = torch.randn(2, 2, 41, 24, device=device, dtype=dtype)  # (B, Hkv, Tk, D): several key blocks
    v = torch.randn(2, 2, 41, 24, device=device, dtype=dtype)
    return {"q": q, "k": k, "v": v}, lambda t, backend: fastgpt.causal_attention(
        t["q"], t["k"], t["v"], backend=backend
    )


def ffn_case(device, dtype):
    tensors = {
        "x": torch.randn(2, 37, 24, device=device, dtype=dtype),  # 74 tokens: several row tiles
        "fc_weight": torch.randn(40, 24, device=device, dtype=dtype) * 0.2,
        "fc_bias": torch.randn(40, device=device, dtype=dtype),
        "proj_weight": torch.randn(24, 40, device=device, dtype=dtype) * 0.2,
        "proj_bias": torch.randn(24, device=device, dtype=dtype),
        "residual": torch.randn(2, 37, 24, device=device, dtype=dtype),
    }
    return tensors, lambda t, backend: fastgpt.fused_ffn(
        t["x"],
        t["fc_weight"],
        t["fc_bias"],
        t["proj_weight"],
        t["proj_bias"],
        residual=t["residual"],
        backend=backend,
    )


def layer_norm_case(device, dtype):
    tensors = {
        "x": torch.randn(150, 48, device=device, dtype=dtype),  # several backward programs' row groups
        "weight": torch.randn(48, device=device, dtype=dtype),
        "bias": torch.randn(48, device=device, dtype=dtype),
        "residual": torch.randn(150, 48, device=device, dtype=dtype),
    }
    return tensors, lambda t, backend: fastgpt.layer_norm(
        t["x"], t["weight"], t["bias"], residual=t["residual"], backend=backend
    )


def cross_entropy_case(device, dtype, reduction):
    targets = torch.randint(0, 45, (2, 25), device=device)
    targets[0, :7] = -100
    tensors = {
        "x": torch.randn(
            2, 25, 16, device=device, dtype=dtype
        ),  # 50 tokens: several chunks (16 rows in fp32)
        "weight": torch.randn(45, 16, device=device, dtype=dtype),
        "bias": torch.randn(45, device=device, dtype=dtype),
    }
    return tensors, lambda t, backend: fastgpt.linear_cross_entropy(
        t["x"], t["weight"], targets, bias=t["bias"], reduction=reduction, backend=backend
    )


CASES = {
    "attention": attention_case,
    "ffn": ffn_case,
    "layer_norm": layer_norm_case,
    "cross_entropy_mean": lambda device, dtype: cross_entropy_case(device, dtype, "mean"),
    "cross_entropy_none": lambda device, dtype: cross_entropy_case(device, dtype, "none"),
}


def run(tensors, call, backend, upstream):
    """Outputs and the gradient of every input, from fresh leaves holding the same values."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}
    outputs = call(leaves, backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, upstream(outputs))
    return [o.detach() for o in outputs] + [leaves[name].grad for name in sorted(leaves)]


def assert_repeatable(case, backend, device, dtype):
    torch.manual_seed(0)
    tensors, call = CASES[case](device, dtype)
    generator = torch.Generator().manual_seed(1)
    upstream_cache = []

    def upstream(outputs):
        if not upstream_cache:
            upstream_cache.extend(torch.randn(o.shape, generator=generator).to(o) for o in outputs)
        return upstream_cache

    first = run(tensors, call, backend, upstream)
    for repeat in range(1, REPEATS):
        again = run(tensors, call, backend, upstream)
        for index, (a, b) in enumerate(zip(first, again, strict=True)):
            assert torch.equal(a, b), f"{case} on {backend}: result {index} differs on call {repeat + 1}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_is_bitwise_repeatable(case, backend):
    assert_repeatable(case, backend, "cpu", torch.float32)


def training_step_results(model, backend, idx, targets):
    """Loss and every parameter after one AdamW step (dropout on: its RNG is seeded the same)."""
    model = copy.deepcopy(model).set_backend(backend).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1234)
    loss = model(idx, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return [loss.detach()] + grads + [p.detach().clone() for p in model.parameters()]


def assert_training_step_repeatable(backend, device, dtype=torch.float32):
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=67, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, dropout=0.1)
    model = GPT(config).to(device=device, dtype=dtype)
    idx = torch.randint(0, 67, (2, 24), device=device)
    targets = torch.randint(0, 67, (2, 24), device=device)
    first = training_step_results(model, backend, idx, targets)
    again = training_step_results(model, backend, idx, targets)
    for index, (a, b) in enumerate(zip(first, again, strict=True)):
        assert torch.equal(a, b), f"GPT training step on {backend}: result {index} differs on the second run"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gpt_training_step_is_bitwise_repeatable(backend):
    assert_training_step_repeatable(backend, "cpu")


# ----------------------------------------------------------------------------------------------
# GPU


def gpu_cases():
    for backend in GPU_BACKENDS:
        for case in CASES:
            yield pytest.param(case, backend, id=f"{case}-{backend}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case, backend", list(gpu_cases()))
def test_gpu_op_is_bitwise_repeatable(case, backend, dtype):
    if backend not in fastgpt.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    assert_repeatable(case, backend, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])  # auto: cuda ops, and triton's cross-entropy
def test_gpu_training_step_is_bitwise_repeatable(backend):
    assert_training_step_repeatable(backend, "cuda", torch.bfloat16)
