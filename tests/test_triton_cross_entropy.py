"""linear_cross_entropy on the triton backend (the CPU interpreter without a GPU) against float64
reference.py, which equals F.cross_entropy on the full logits: the loss and every gradient for each
reduction, ignored targets, several chunks with a ragged last one, odd vocabularies, empty and NaN
inputs, huge logits, the chunk-bounded memory at vocab 50257, and opcheck."""

import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tolerance import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt
from fastgpt import reference
from fastgpt.ops import triton_cross_entropy

pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="Triton backend unavailable"
)

IGNORE = -100


def make_inputs(lead, channels, vocab, dtype, *, bias=True, ignored=2, device="cpu"):
    x = torch.randn(*lead, channels, device=device)
    weight = torch.randn(vocab, channels, device=device) / channels**0.5 * 3  # logits spread over a few units
    bias_vector = torch.randn(vocab, device=device) if bias else None
    targets = torch.randint(0, vocab, lead, device=device)
    targets.view(-1)[torch.randperm(targets.numel(), device=device)[:ignored]] = IGNORE
    return [t.to(dtype) if t is not None else None for t in (x, weight, bias_vector)] + [targets]


def loss_and_grads(inputs, reduction, backend, grad_out=None, dtype=None):
    x, weight, bias, targets = inputs
    leaves = [
        t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    x, weight, bias = leaves
    if backend == "reference":
        loss = reference.linear_cross_entropy(x, weight, targets, bias, IGNORE, reduction)
    else:
        loss = fastgpt.linear_cross_entropy(
            x, weight, targets, bias=bias, ignore_index=IGNORE, reduction=reduction, backend=backend
        )
    if grad_out is None:
        grad_out = torch.rand_like(loss) + 0.5
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present, grad_out.to(loss.dtype))
    named = dict(zip([n for n, t in zip(("x", "weight", "bias"), leaves) if t is not None], grads))
    return loss.detach(), named, grad_out


def check_against_reference(inputs, reduction):
    loss, grads, grad_out = loss_and_grads(inputs, reduction, "triton")
    loss64, grads64, _ = loss_and_grads(inputs, reduction, "reference", grad_out, dtype=torch.float64)
    loss_eager, grads_eager, _ = loss_and_grads(inputs, reduction, "reference", grad_out)
    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, loss_eager)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert grads[name].dtype == inputs[0].dtype
        assert_close(f"d{name}", grads[name], grads64[name], grads_eager[name])
    return loss, grads


def test_reference_is_f_cross_entropy():
    """The float64 reference the kernels are held to is F.cross_entropy on the full logits."""
    x, weight, bias, targets = make_inputs((40,), 16, 33, torch.float64)
    logits = F.linear(x, weight, bias)
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
        torch.testing.assert_close(
            reference.linear_cross_entropy(x, weight, targets, bias, IGNORE, reduction), expected
        )


@pytest.mark.parametrize(
    "dtype, reduction, lead, channels, vocab, bias",
    [
        (torch.float32, "mean", (2, 50), 17, 131, True),  # 3 chunks of 48, 48 and 4 tokens
        (torch.float32, "sum", (70,), 11, 33, False),  # 3 chunks of 32, 32 and 6 tokens
        (torch.float32, "none", (3, 11), 33, 70, True),
        (torch.float32, "mean", (1,), 33, 1, False),
        (torch.float16, "mean", (70,), 9, 131, True),  # 2 chunks of 48 and 22 tokens, dW cast at the end
        (torch.float16, "none", (33,), 17, 70, True),
        (torch.float16, "sum", (2, 17), 70, 33, True),  # split-K dx
    ],
)
def test_matches_reference(dtype, reduction, lead, channels, vocab, bias):
    check_against_reference(make_inputs(lead, channels, vocab, dtype, bias=bias), reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_vocabulary_block(monkeypatch, reduction):
    """The row kernel at the GPU's BLOCK_V (4096), which the interpreter's half-vocabulary blocks never
    run: 4099 entries make one full block and a ragged 3-wide one, so the online logsumexp rescales
    across a full block; fp32, 12 tokens with ignored rows, the loss pass and the gradient pass ("none"
    gives the lse back to a second pass with per-row scales)."""
    monkeypatch.setattr(triton_cross_entropy, "triton_interpreter_enabled", lambda: False)
    assert triton_cross_entropy._block_v(4099) == triton_cross_entropy.BLOCK_V
    check_against_reference(make_inputs((12,), 8, 4099, torch.float32), reduction)


def test_strided_inputs_are_read_in_place():
    x = torch.randn(33, 40).t()  # (40, 33), column-major
    weight = torch.randn(70, 50)[:, :33] / 2  # (70, 33), row stride 50
    targets = torch.randint(0, 70, (40, 2))[:, 0]  # stride 2
    check_against_reference([x, weight, torch.randn(70), targets], "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored(reduction):
    inputs = make_inputs((9,), 16, 33, torch.float32, ignored=9)
    loss, grads = check_against_reference(inputs, reduction)
    if reduction == "mean":
        assert loss.isnan()
    for grad in grads.values():
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, weight, bias, targets = make_inputs((0,), 16, 33, torch.float32, ignored=0)
    loss, grads, _ = loss_and_grads([x, weight, bias, targets], reduction, "triton")
    expected = F.cross_entropy(F.linear(x, weight, bias), targets, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert grads["x"].shape == (0, 16)
    assert torch.equal(grads["weight"], torch.zeros_like(weight)) and torch.equal(
        grads["bias"], torch.zeros_like(bias)
    )


def test_nan_stays_in_its_row():
    inputs = make_inputs((40,), 16, 33, torch.float32, ignored=0)
    inputs[0][6, 2] = float("nan")
    loss, grads = check_against_reference(inputs, "none")
    assert loss.isnan().nonzero().flatten().tolist() == [6]
    assert grads["x"].isnan().any(dim=1).nonzero().flatten().tolist() == [6]


def test_huge_logits_do_not_overflow():
    x, weight, bias, targets = make_inputs((20,), 16, 33, torch.float32)
    loss, _ = check_against_reference([x * 300, weight, bias * 1e4, targets], "mean")  # logits of order 1e4
    assert loss.isfinite()


def test_masked_vocabulary():
    """A bias of -inf masks classes; here every logit of the row kernel's first block is -inf."""
    x, weight, bias, _ = make_inputs((20,), 16, 70, torch.float32)
    bias[:64] = float("-inf")
    targets = torch.randint(64, 70, (20,))
    loss, _ = check_against_reference([x, weight, bias, targets], "none")
    assert loss.isfinite().all()


def test_opcheck():
    x, weight, bias, targets = make_inputs((2, 5), 8, 11, torch.float32)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    forward = torch.ops.fastgpt.triton_linear_cross_entropy.default
    torch.library.opcheck(forward, (x, weight, targets, bias, IGNORE, "mean", True))
    torch.library.opcheck(forward, (x, weight, targets, None, IGNORE, "none", True))
    _, lse, *_ = forward(x, weight, targets, bias, IGNORE, "none", False)
    backward = torch.ops.fastgpt.triton_linear_cross_entropy_backward.default
    grad_loss = torch.randn(2, 5)
    torch.library.opcheck(
        backward, (grad_loss, x.detach(), weight.detach(), targets, bias.detach(), lse, IGNORE)
    )


# ----------------------------------------------------------------------------------------------
# Memory


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once among those created while active, and the largest
    one. Tensors that exist beforehand are not counted. fastgpt custom ops run their CPU implementation
    with the mode still active, so the buffers their launchers allocate are counted too."""

    def __init__(self, existing):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.tracked = {t.untyped_storage()._cdata for t in existing}

    def _release(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastgpt":
            with self:  # run the op's CPU implementation with this mode watching its allocations
                out = func.redispatch(
                    torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {})
                )
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage._cdata in self.tracked:
                continue
            self.tracked.add(storage._cdata)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._release, storage._cdata, storage.nbytes())
        return out


def peak_memory_of_backward(loss_fn, *inputs):
    """Peak memory of loss_fn(*inputs).backward(), counting only what it allocates."""
    tracker = PeakMemory(inputs)
    with tracker:
        loss_fn(*inputs).backward()
    return tracker


def triton_loss(x, weight, targets):
    return fastgpt.linear_cross_entropy(x, weight, targets, backend="triton")


def eager_loss(x, weight, targets):
    return F.cross_entropy(x @ weight.t(), targets)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extra_memory_is_bounded_by_one_chunk(monkeypatch, dtype):
    """At GPT-2's vocabulary, forward + backward allocate one chunk of logits (plus, in 16-bit, the
    fp32 dW accumulator) beyond the gradients they return, however many tokens there are, while eager
    F.cross_entropy(x @ W.T) allocates several tokens x vocab tensors.

    Memory is allocated only by the launcher, never by a kernel, so the kernel launches are replaced by
    no-ops here: at vocab 50257 the interpreter would run ~10^4 GEMM tiles per chunk. The kernels are
    tested at small vocabularies above."""
    monkeypatch.setattr(triton_cross_entropy, "matmul", lambda *args, **kwargs: None)
    monkeypatch.setattr(triton_cross_entropy, "sum_rows", lambda *args, **kwargs: None)
    monkeypatch.setattr(triton_cross_entropy, "cross_entropy_rows_kernel", _NoLaunch())
    vocab, channels, element = 50257, 64, dtype.itemsize
    padded_vocab = 50304  # the logits buffer's row stride (LOGITS_ROW_ALIGNMENT)
    chunk = triton_cross_entropy.chunk_rows(1 << 20, channels, element)
    peaks = {}
    few, many = 4 * chunk, 16 * chunk
    for tokens in (few, many):
        x = torch.randn(tokens, channels, dtype=dtype, requires_grad=True)
        weight = torch.randn(vocab, channels, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,))
        mine = peak_memory_of_backward(triton_loss, x, weight, targets)
        gradients = (tokens + vocab) * channels * element  # dx and dW
        accumulator = vocab * channels * 4 if dtype != torch.float32 else 0
        # Forward: one chunk of logits, the fp32 dW accumulator (16-bit only) and the gradients it keeps.
        # Backward: the kept gradients and their copies scaled by the incoming gradient.
        forward = chunk * padded_vocab * element + accumulator + gradients
        per_token = 64 * tokens + 65536  # losses, lse, masks: a few bytes a token
        assert mine.largest <= max(chunk * padded_vocab * element, vocab * channels * 4)
        assert mine.peak <= max(forward, 2 * gradients) + per_token
        peaks[tokens] = mine.peak
    # More tokens add dx rows (kept and scaled: twice) and per-token vectors, nothing x vocab.
    assert peaks[many] - peaks[few] <= (many - few) * (2 * channels * element + 64)

    if dtype == torch.float32:  # eager on CPU in fp16 is too slow for the test budget
        theirs = peak_memory_of_backward(eager_loss, x, weight, targets)
        assert theirs.peak >= 3 * tokens * vocab * element
        assert mine.peak <= 0.25 * theirs.peak


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_on_gpu(reduction):
    check_against_reference(
        make_inputs((4, 1000), 768, 50257, torch.bfloat16, bias=False, ignored=100, device="cuda"), reduction
    )
