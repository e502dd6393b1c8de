"""How a training step runs (fastgpt.train.step): the choice of mode, its argument checks, the compile
mode against eager on CPU, and, on a GPU, the whole step replayed from a CUDA graph against eager."""

import pytest
import torch
from host_reads import HostReadRecorder

import fastgpt
from fastgpt import dispatch
from fastgpt.nn import GPT, GPTConfig
from fastgpt.train.data import split_tokens, stdlib_corpus
from fastgpt.train.errors import UserError
from fastgpt.train.loop import Settings, Trainer
from fastgpt.train.runtime import Runtime
from fastgpt.train.step import CapturedStep, choose_step_mode, set_learning_rate
from fastgpt.train.tokenizer import ByteTokenizer

SEQ_LEN = 16
MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=SEQ_LEN, vocab_size=257)  # one block: every op
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def token_split():
    tokens = ByteTokenizer().encode_documents(stdlib_corpus(max_bytes=100_000).documents)
    return split_tokens(tokens, SEQ_LEN)


def make_trainer(token_split, step_mode, device=CPU, dtype=torch.float32, dropout=0.0, **settings):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, dropout=dropout)).to(device)
    settings = Settings(
        **{"steps": 8, "batch_size": 4, "seq_len": SEQ_LEN, "lr": 3e-3, "eval_windows": 4, **settings}
    )
    return Trainer(
        model, ByteTokenizer(), *token_split, settings, Runtime(device, dtype), step_mode=step_mode
    )


# ----------------------------------------------------------------------------------------------
# Choosing the mode


@pytest.mark.parametrize(
    "requested, device, world_size, expected, reason",
    [
        ("auto", CPU, 1, "eager", "auto on cpu"),
        ("auto", CPU, 2, "eager", "auto on cpu"),
        ("auto", CUDA, 1, "compile", "auto on CUDA"),
        ("auto", CUDA, 4, "compile", "auto under torchrun (4 processes)"),
        ("cuda-graph", CPU, 1, "eager", "cuda-graph needs a CUDA device; running eager on cpu"),
        ("cuda-graph", CUDA, 1, "cuda-graph", "as asked"),
        ("compile", CPU, 1, "compile", "as asked"),
        ("compile", CUDA, 2, "compile", "as asked"),
        ("eager", CUDA, 1, "eager", "as asked"),
    ],
)
def test_choose_step_mode(requested, device, world_size, expected, reason):
    mode, why = choose_step_mode(requested, device, world_size)
    assert mode == expected
    assert why.startswith(reason)


def test_choose_step_mode_rejects_bad_requests():
    with pytest.raises(ValueError, match=r"step_mode must be one of \('auto', .*\), got 'fast'"):
        choose_step_mode("fast", CPU)
    with pytest.raises(TypeError, match="step_mode must be a str, .* got int"):
        choose_step_mode(1, CPU)
    with pytest.raises(UserError, match="--step-mode cuda-graph runs one process, got 2 under torchrun"):
        choose_step_mode("cuda-graph", CUDA, 2)


def test_trainer_rejects_an_unresolved_or_impossible_mode(token_split):
    with pytest.raises(
        ValueError, match=r"step_mode must be one of \('eager', 'compile', 'cuda-graph'\), got 'auto'"
    ):
        make_trainer(token_split, "auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="step_mode 'cuda-graph' needs a CUDA device, got cpu"):
            make_trainer(token_split, "cuda-graph")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_captured_step_needs_cuda():
    with pytest.raises(RuntimeError, match="CapturedStep needs a CUDA device"):
        CapturedStep(lambda: torch.zeros(()))


def test_set_learning_rate_updates_tensor_rates_in_place():
    weight = torch.nn.Parameter(torch.randn(3))
    by_float = torch.optim.AdamW([weight], lr=1e-3)
    by_tensor = torch.optim.AdamW([weight], lr=torch.tensor(1e-3), capturable=True)
    tensor_rate = by_tensor.param_groups[0]["lr"]
    for optimizer in (by_float, by_tensor):
        set_learning_rate(optimizer, 5e-4)
    assert by_float.param_groups[0]["lr"] == 5e-4
    assert by_tensor.param_groups[0]["lr"] is tensor_rate  # the tensor a captured graph reads
    assert float(tensor_rate) == pytest.approx(5e-4)


# ----------------------------------------------------------------------------------------------
# The compile mode on CPU


def test_compile_mode_trains_like_eager(token_split):
    """The same steps under torch.compile(fullgraph=True) give eager's losses and weights (up to the
    rounding of fused glue), on the same batches."""
    eager, compiled = make_trainer(token_split, "eager"), make_trainer(token_split, "compile")
    eager_losses = [eager.train_step() for _ in range(3)]
    compiled_losses = [compiled.train_step() for _ in range(3)]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, expected), actual in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# What the captured step may not do, checked on CPU

CAPTURABLE_STEP_CASES = [("reference", torch.float32), ("reference", torch.bfloat16)]
if "triton" in fastgpt.available_backends() and not torch.cuda.is_available():
    CAPTURABLE_STEP_CASES.append(("triton", torch.float32))  # the interpreter: no bfloat16


@pytest.mark.parametrize("backend, dtype", CAPTURABLE_STEP_CASES, ids=lambda value: str(value))
def test_whole_step_reads_nothing_on_the_host(token_split, backend, dtype):
    """The step --step-mode cuda-graph captures (Trainer._whole_step: forward and backward of two
    micro-batches with dropout, the bfloat16 gradients cast into the float32 master weights, clipping,
    AdamW(fused=True, capturable=True) with a tensor rate, zero_grad, the weights copied back) calls no
    aten op that reads values on the host, on CPU with the optimizer the cuda-graph mode builds. The
    cpu backend is left out: its cross-entropy backward counts the kept rows of CPU targets on the host
    by design (csrc/autograd.cpp, mean_scale), and on CUDA the same backward stays on the device."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, dropout=0.1, backend=backend))
    settings = Settings(steps=4, batch_size=4, seq_len=SEQ_LEN, eval_windows=4, grad_accum=2)
    trainer = Trainer(model, ByteTokenizer(), *token_split, settings, Runtime(CPU, dtype), step_mode="eager")
    groups = [{k: v for k, v in group.items() if k != "names"} for group in trainer.param_groups]
    trainer.optimizer = torch.optim.AdamW(groups, lr=torch.tensor(1e-3), fused=True, capturable=True)
    batch = trainer.process_batch()
    trainer._whole_step(*batch)  # AdamW's state exists before the step that is watched, as after warm-up
    before = [parameter.clone() for parameter in model.parameters()]
    # dispatch.check_index_range reads CPU values only (CUDA ones in debug mode outside a capture:
    # tests/test_dispatch.py), so its reads of these CPU tensors stand for none on the GPU.
    with HostReadRecorder(allowed=(dispatch.check_index_range,)) as recorder:
        loss = trainer._whole_step(*batch)
    assert recorder.reads == []
    assert torch.isfinite(loss)
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


# ----------------------------------------------------------------------------------------------
# The CUDA graph (GPU only)


@pytest.mark.gpu
def test_captured_step_reads_each_new_batch():
    """Warm-up calls run eagerly, the next captures, and every replay computes on the batch given."""
    static = torch.zeros(4, device=CUDA)
    step = CapturedStep(lambda x: (x * 2).sum(), [static], warmup_steps=1)
    for call in range(4):
        batch = torch.arange(4.0) + call
        assert float(step(batch)) == pytest.approx(2 * float(batch.sum()))
        assert step.captured == (call >= 1)
    assert step.pool_bytes() > 0


@pytest.mark.gpu
def test_dropout_in_a_captured_step_draws_fresh_masks():
    """The default CUDA generator is graph-safe: each replay advances its offset, so masks differ."""
    static = torch.ones(4096, device=CUDA)
    step = CapturedStep(lambda x: torch.nn.functional.dropout(x, 0.5).clone(), [static], warmup_steps=1)
    masks = [step(torch.ones(4096)).clone() for _ in range(4)]
    assert step.captured
    assert not torch.equal(masks[2], masks[3])  # two replays
    for mask in masks:
        assert 0.4 < (mask == 0).float().mean() < 0.6


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, grad_accum", [(torch.float32, 1), (torch.bfloat16, 2)], ids=["float32", "bfloat16-accum2"]
)
def test_cuda_graph_mode_trains_like_eager(token_split, dtype, grad_accum):
    """Three eager warm-up steps, the capture, then replays: the same losses and weights as eager."""
    eager = make_trainer(token_split, "eager", CUDA, dtype, grad_accum=grad_accum)
    graphed = make_trainer(token_split, "cuda-graph", CUDA, dtype, grad_accum=grad_accum)
    steps = 6
    eager_losses = [eager.train_step() for _ in range(steps)]
    graphed_losses = [graphed.train_step() for _ in range(steps)]
    assert graphed.run_step.captured
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert graphed_losses == pytest.approx(eager_losses, rel=tolerance)
    for (name, expected), actual in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=100 * tolerance, atol=100 * tolerance, msg=name)
    assert graphed.evaluate() < graphed_losses[0]


@pytest.mark.gpu
def test_compile_mode_trains_like_eager_on_gpu(token_split):
    """--step-mode auto's choice on a GPU: the bfloat16 model under torch.compile (the cuda backend's
    C++ operators and Triton's cross-entropy opaque, Inductor's CUDA code around them) gives eager's
    gradients on the same weights and batch (up to the rounding of fused glue), then eager's losses."""
    eager = make_trainer(token_split, "eager", CUDA, torch.bfloat16, grad_accum=2)
    compiled = make_trainer(token_split, "compile", CUDA, torch.bfloat16, grad_accum=2)
    inputs, targets = (tensor[:2].to(CUDA) for tensor in eager.process_batch())  # a micro-batch's shape
    compiled.process_batch()  # the two samplers stay in step
    for trainer in (eager, compiled):
        trainer.wrapped(inputs, targets).backward()
    for (name, expected), actual in zip(
        eager.compute_model.named_parameters(), compiled.compute_model.parameters()
    ):
        scale = float(expected.grad.abs().max())
        torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=0.05 * scale, msg=name)
        actual.grad = expected.grad = None
    eager_losses = [eager.train_step() for _ in range(3)]
    compiled_losses = [compiled.train_step() for _ in range(3)]
    assert compiled_losses == pytest.approx(eager_losses, rel=2e-2)


@pytest.mark.gpu
def test_cuda_graph_mode_with_dropout_trains(token_split, monkeypatch):
    # Debug mode too: GPT.forward's range checks of the tokens read CUDA values, except in the capture.
    monkeypatch.setenv("FASTGPT_DEBUG", "1")
    trainer = make_trainer(token_split, "cuda-graph", CUDA, dropout=0.1)
    losses = [trainer.train_step() for _ in range(8)]
    assert trainer.run_step.captured
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.evaluate() < losses[0]


@pytest.mark.gpu
@pytest.mark.parametrize("step_mode", ["cuda-graph", "compile"])
def test_activation_checkpointing_trains_like_eager_on_gpu(token_split, step_mode):
    """Activation checkpointing inside a captured step (no dropout: nothing random to recompute) and under
    torch.compile: the losses of the plain eager run."""
    eager = make_trainer(token_split, "eager", CUDA)
    checkpointed = make_trainer(token_split, step_mode, CUDA, activation_checkpointing=True)
    eager_losses = [eager.train_step() for _ in range(5)]
    assert [checkpointed.train_step() for _ in range(5)] == pytest.approx(eager_losses, rel=1e-4)
