"""Linear cross-entropy in Triton: cross_entropy(x @ W^T + b, targets) without (tokens, vocab) logits.

The tokens are processed in chunks. For each chunk:
1. logits = x_chunk @ W^T + b, a GEMM into one reused (chunk, V) buffer in the input dtype;
2. one program per row streams its logits twice: an online logsumexp gives lse and, with one load of
   the target's logit, the loss; the second pass overwrites the logits in place with
   dloss/dlogits = (softmax - onehot(target)) * scale (0 on ignored rows);
3. dx_chunk = dlogits @ W (split-K when the chunk has too few output tiles to fill the GPU), and
   dW^T += x_chunk^T @ dlogits, accumulated in fp32 across chunks in the GEMM's epilogue and cast to
   the input dtype after the logits buffer is freed (one chunk, or fp32 inputs, write dW directly);
   a virtual row of ones under x_chunk^T yields db.

Peak extra memory is one chunk of logits plus the fp32 dW accumulator (bf16/fp16 only) and never
grows with the token count; see `chunk_rows`.

Reductions. 'sum' and 'mean' form the gradients during the forward with scale 1 or 1 / n_kept
(n_kept counted on the device: no host sync, no data-dependent shape) and keep them; the backward
multiplies them by the incoming scalar gradient. 'none' cannot do that, since each row's upstream
gradient multiplies that row's dlogits before they are summed into dW; its forward stores the
per-row lse (fp32, one per token) and its backward repeats the chunk loop with the per-row upstream
gradient as the scale (one more logits GEMM; the online logsumexp pass is skipped thanks to lse).
"""

import torch
import triton
import triton.language as tl

from fastgpt import dispatch
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.ops.device import on_device_of
from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_gemm import (
    GEMM_DTYPES,
    LOG2E,
    compile_case,
    matmul,
    matmul_arguments,
    matmul_compile_cases,
    split_k_for,
    sum_rows,
)

# ----------------------------------------------------------------------------------------------
# Constants

SUPPORTED_DTYPES = GEMM_DTYPES

# Scale of dlogits in the row kernel.
SCALE_ONE: tl.constexpr = tl.constexpr(0)  # 'sum'
SCALE_MEAN: tl.constexpr = tl.constexpr(1)  # 'mean': 1 / n_kept, read on the device
SCALE_PER_ROW: tl.constexpr = tl.constexpr(2)  # 'none' backward: the row's upstream gradient

# Vocabulary elements per step of the row kernel: 4096 fp32 values over 8 warps is 16 per thread,
# and GPT-2's 50257 takes 13 steps. The interpreter takes two steps per row, so the online
# logsumexp's rescaling and the ragged last block are exercised even at small test vocabularies.
BLOCK_V = 4096
ROW_KERNEL_WARPS = 8
INTERPRETER_MIN_BLOCK_V = 16
# Chunk rows are a multiple of 16, the smallest tile the GEMMs' dot products take.
CHUNK_ROW_MULTIPLE = 16
# The logits buffer's row stride is the vocabulary rounded up to 64 values (128 bytes in 16 bits), so
# its rows are aligned for 16-byte vector loads and stores in the GEMMs and the row kernel whatever the
# vocabulary: GPT-2's 50257 would otherwise make every row stride odd and every access 2 bytes wide.
LOGITS_ROW_ALIGNMENT = 64


def chunk_rows(tokens, channels, element_size):
    """Tokens per chunk.

    Liger-Kernel sizes chunks so the logits chunk is about as large as x (chunk ~ tokens * C / V).
    Here the chunk's logits (rows x V x element_size bytes) may be three times as large as the fp32
    weight-gradient accumulator this op needs anyway (V x C x 4 bytes): at most 12 C / element_size
    rows, 4608 tokens in bf16 at GPT-2 small (C 768). So the extra memory stays within about four
    times the accumulator, whatever the token count: at 8192 tokens of GPT-2, about 580 MB, 0.24x
    the 2.30 GiB torch.compile's cross-entropy allocated on the H200. Each chunk after the first
    rereads and rewrites the accumulator in the dW GEMM's epilogue, so the chunks are as large as that
    allows and equal in size: 8192 tokens run in two chunks of 4096, and two GEMMs touch the
    accumulator (csrc/cuda/api_cuda.inc's logits_chunk_rows follows the same rule).
    """
    max_rows = max(
        CHUNK_ROW_MULTIPLE, (12 * channels // element_size) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    )
    chunks = triton.cdiv(tokens, max_rows)
    rows = triton.cdiv(triton.cdiv(tokens, max(chunks, 1)), CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return min(rows, tokens)


def logits_buffer(rows, vocab, dtype, device):
    """An uninitialised (rows, vocab) logits buffer whose row stride is vocab rounded up to
    LOGITS_ROW_ALIGNMENT."""
    padded = triton.cdiv(vocab, LOGITS_ROW_ALIGNMENT) * LOGITS_ROW_ALIGNMENT
    return torch.empty((rows, padded), dtype=dtype, device=device)[:, :vocab]


def _block_v(vocab):
    if triton_interpreter_enabled():
        return min(BLOCK_V, max(INTERPRETER_MIN_BLOCK_V, triton.next_power_of_2(triton.cdiv(vocab, 2))))
    return min(BLOCK_V, triton.next_power_of_2(vocab))


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr,  # (rows, V) this chunk's logits; replaced by dloss/dlogits when COMPUTE_GRAD
    stride_lm,  # distance between logit rows
    targets_ptr,  # (rows,) int64 class indices
    loss_ptr,  # (rows,) fp32 per-row loss, 0 on ignored rows (COMPUTE_LOSS)
    lse_ptr,  # (rows,) fp32 logsumexp: written, or read when LSE_GIVEN
    kept_ptr,  # () int64 number of rows whose target is not ignore_index (SCALE == SCALE_MEAN)
    row_scale_ptr,  # (rows,) upstream gradient of each row's loss (SCALE == SCALE_PER_ROW)
    stride_row_scale,  # row_scale's stride (0 when broadcast)
    V,  # vocabulary size
    ignore_index,  # rows with this target add nothing
    COMPUTE_LOSS: tl.constexpr,  # write loss_ptr
    COMPUTE_GRAD: tl.constexpr,  # overwrite the logits with dloss/dlogits
    LSE_GIVEN: tl.constexpr,  # read lse_ptr instead of computing it
    SCALE: tl.constexpr,  # SCALE_ONE, SCALE_MEAN or SCALE_PER_ROW
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_lm
    target = tl.load(targets_ptr + row)
    kept = target != ignore_index
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + row)
    else:
        # Online logsumexp with one block-wide reduction per step, the maximum: each lane keeps its
        # own sum of exp, rescaled whenever the maximum grows, and the lanes' sums are added once at
        # the end. The target's logit is one load, masked to the row, so no target reads outside it.
        # The row is read again by the gradient pass right after: its lines are kept in L2 (evict_last;
        # the programs in flight hold about as many rows as H100/H200's 50-60 MB of L2 takes), and
        # that second read lets them go first (evict_first).
        running_max = tl.zeros((), dtype=tl.float32) - float("inf")
        lane_sums = tl.zeros((BLOCK_V,), dtype=tl.float32)  # (BLOCK_V,)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(
                row_logits_ptr + offs, mask=offs < V, other=float("-inf"), eviction_policy="evict_last"
            ).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # no -inf - -inf while all is -inf
            lane_sums = lane_sums * tl.exp2((running_max - base) * LOG2E) + tl.exp2((z - base) * LOG2E)
            running_max = new_max
        lse = running_max + tl.log2(tl.sum(lane_sums, axis=0)) / LOG2E
        tl.store(lse_ptr + row, lse)
        if COMPUTE_LOSS:
            in_row = kept & (target >= 0) & (target < V)
            target_logit = tl.load(row_logits_ptr + target, mask=in_row, other=0.0).to(tl.float32)
            tl.store(loss_ptr + row, tl.where(kept, lse - target_logit, 0.0))

    if COMPUTE_GRAD:
        if SCALE == SCALE_MEAN:
            scale = 1.0 / tl.maximum(tl.load(kept_ptr), 1).to(tl.float32)
        elif SCALE == SCALE_PER_ROW:
            scale = tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
        else:
            scale = 1.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(row_logits_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(
                tl.float32
            )
            probs = tl.exp2((z - lse) * LOG2E)
            grad = (probs - tl.where(offs == target, 1.0, 0.0)) * scale
            grad = tl.where(kept, grad, 0.0)  # exact zeros on ignored rows
            tl.store(row_logits_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers


def _rows_arguments(
    logits, targets, losses, lse, kept, row_scale, ignore_index, compute_loss, compute_grad, lse_given, scale
):
    placeholder = lse
    return {
        "logits_ptr": logits,
        "stride_lm": logits.stride(0),
        "targets_ptr": targets,
        "loss_ptr": losses if losses is not None else placeholder,
        "lse_ptr": lse,
        "kept_ptr": kept if kept is not None else targets,
        "row_scale_ptr": row_scale if row_scale is not None else placeholder,
        "stride_row_scale": row_scale.stride(0) if row_scale is not None else 0,
        "V": logits.shape[1],
        "ignore_index": ignore_index,
        "COMPUTE_LOSS": compute_loss,
        "COMPUTE_GRAD": compute_grad,
        "LSE_GIVEN": lse_given,
        "SCALE": scale,
    }


def _chunk_loop(x2, weight, targets, bias, ignore_index, *, losses, lse, kept, row_scale, scale, grads):
    """Runs the chunks. `grads` is None (loss only) or (dx2, dbias) to fill (dbias None without a
    bias); with `row_scale` the lse is given and only gradients are formed. Fills the tensors it is
    given and returns dW (V, C) in x's dtype when `grads` is given, else None."""
    tokens, channels = x2.shape
    vocab = weight.shape[0]
    dtype, device = x2.dtype, x2.device
    if tokens == 0:
        if grads is None:
            return None
        if grads[1] is not None:
            grads[1].zero_()
        return torch.zeros((vocab, channels), dtype=dtype, device=device)
    rows_per_chunk = chunk_rows(tokens, channels, dtype.itemsize)
    chunk_starts = range(0, tokens, rows_per_chunk)
    logits = logits_buffer(rows_per_chunk, vocab, dtype, device)  # (chunk, V), reused by every chunk
    block_v = _block_v(vocab)
    num_warps = 1 if triton_interpreter_enabled() else ROW_KERNEL_WARPS

    if grads is not None:
        dx2, dbias = grads
        # fp32 weights accumulate in dW itself; 16-bit ones in an fp32 buffer, unless one chunk does it all.
        in_place = dtype == torch.float32 or len(chunk_starts) == 1
        dweight = new_output((vocab, channels), dtype, device) if in_place else None
        weight_accumulator = (
            dweight if in_place else torch.empty((vocab, channels), dtype=torch.float32, device=device)
        )
        bias_accumulator = (
            torch.empty(vocab, dtype=torch.float32, device=device) if dbias is not None else None
        )
        splits = {
            rows: split_k_for(rows, channels, vocab, device)
            for rows in {rows_per_chunk, tokens - chunk_starts[-1]}
        }
        partial_size = max(split * rows * channels if split > 1 else 0 for rows, split in splits.items())
        partials = torch.empty(partial_size, dtype=torch.float32, device=device)

    for index, start in enumerate(chunk_starts):
        rows = min(rows_per_chunk, tokens - start)
        x_chunk = x2[start : start + rows]  # (rows, C)
        chunk_logits = logits[:rows]  # (rows, V)
        matmul(x_chunk, weight.t(), chunk_logits, bias=bias)
        row_scale_chunk = row_scale[start : start + rows] if row_scale is not None else None
        args = _rows_arguments(
            chunk_logits,
            targets[start : start + rows],
            losses[start : start + rows] if losses is not None else None,
            lse[start : start + rows],
            kept,
            row_scale_chunk,
            ignore_index,
            compute_loss=losses is not None,
            compute_grad=grads is not None,
            lse_given=row_scale is not None,
            scale=scale,
        )
        cross_entropy_rows_kernel[(rows,)](**args, BLOCK_V=block_v, num_warps=num_warps)
        if grads is None:
            continue

        dx_chunk = dx2[start : start + rows]  # (rows, C), contiguous
        split = splits[rows]
        if split == 1:
            matmul(chunk_logits, weight, dx_chunk)
        else:
            partial = partials[: split * rows * channels].view(split, rows, channels)
            matmul(chunk_logits, weight, partial, split_k=split)
            sum_rows(partial.view(split, rows * channels), dx_chunk.view(-1))

        # dW^T (C, V) (+)= x_chunk^T @ dlogits, through transposed views; the ones row adds db.
        matmul(
            x_chunk.t(),
            chunk_logits,
            weight_accumulator.t(),
            accumulate=weight_accumulator.t() if index > 0 else None,
            bias_grad=bias_accumulator,
        )

    if grads is None:
        return None
    if dbias is not None:
        dbias.copy_(bias_accumulator)
    if dweight is None:
        del logits, chunk_logits  # freed before the cast allocates dW, so the two never coexist
        dweight = weight_accumulator.to(dtype)
    return dweight


def cross_entropy_forward(x, weight, targets, bias, ignore_index, reduction, compute_grads):
    """Returns (loss, lse, dx, dweight, dbias). The gradients are those of the reduced loss for an
    upstream gradient of 1, formed here for 'sum' and 'mean' when compute_grads; otherwise empty."""
    channels = x.shape[-1]
    x2 = x.reshape(-1, channels)  # (N, C), a view whenever the leading dims can be merged
    targets1 = targets.reshape(-1).contiguous()  # (N,), read with unit stride
    tokens = x2.shape[0]
    vocab = weight.shape[0]
    dtype, device = x.dtype, x.device
    losses = new_output((tokens,), torch.float32, device)
    lse = new_output((tokens,), torch.float32, device)
    kept = (targets1 != ignore_index).sum()  # () int64, stays on the device
    grads = None
    if compute_grads and reduction != "none":
        dbias = new_output((vocab,), dtype, device) if bias is not None else None
        grads = (new_output((tokens, channels), dtype, device), dbias)
    scale = SCALE_MEAN.value if reduction == "mean" else SCALE_ONE.value
    dweight = _chunk_loop(
        x2,
        weight,
        targets1,
        bias,
        ignore_index,
        losses=losses,
        lse=lse,
        kept=kept,
        row_scale=None,
        scale=scale,
        grads=grads,
    )

    if reduction == "none":
        loss = losses.view(targets.shape)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / kept  # 0 / 0 = NaN when every target is ignored, as in torch
    if grads is None:
        return loss, lse, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dx2, dbias = grads
    return loss, lse, dx2.view(x.shape), dweight, dbias if dbias is not None else x.new_empty(0)


def cross_entropy_backward_none(grad_loss, x, weight, targets, bias, lse, ignore_index):
    """Gradients (dx, dweight, dbias) of reduction='none' for per-row upstream gradients grad_loss."""
    channels = x.shape[-1]
    x2 = x.reshape(-1, channels)
    tokens = x2.shape[0]
    vocab = weight.shape[0]
    dtype, device = x.dtype, x.device
    dbias = new_output((vocab,), dtype, device) if bias is not None else None
    grads = (new_output((tokens, channels), dtype, device), dbias)
    dweight = _chunk_loop(
        x2,
        weight,
        targets.reshape(-1).contiguous(),
        bias,
        ignore_index,
        losses=None,
        lse=lse,
        kept=None,
        row_scale=grad_loss.reshape(-1),
        scale=SCALE_PER_ROW.value,
        grads=grads,
    )
    dx2, dbias = grads
    return dx2.view(x.shape), dweight, dbias if dbias is not None else x.new_empty(0)


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("fastgpt::triton_linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks its arguments as linear_cross_entropy does, but for the targets' values (the kernels read
    a target's logit only when it lies in the row): a user may call the operator directly."""
    op = "fastgpt::triton_linear_cross_entropy"
    dispatch.validate_cross_entropy(x, weight, targets, bias, ignore_index, reduction, op, check_values=False)
    dispatch.check_kernel_dtype(op, "x", x, SUPPORTED_DTYPES)
    with on_device_of(x):
        return cross_entropy_forward(x, weight, targets, bias, ignore_index, reduction, compute_grads)


@_linear_cross_entropy_op.register_fake
def _(x, weight, targets, bias, ignore_index, reduction, compute_grads):
    loss = x.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    lse = x.new_empty((targets.numel(),), dtype=torch.float32)
    if not compute_grads or reduction == "none":
        return loss, lse, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dbias = x.new_empty(weight.shape[:1]) if bias is not None else x.new_empty(0)
    return loss, lse, x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


@torch.library.custom_op("fastgpt::triton_linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks x, weight, targets and bias as the forward operator does, and grad_loss and lse (one
    float32 value per row) against them."""
    op = "fastgpt::triton_linear_cross_entropy_backward"
    dispatch.validate_cross_entropy(x, weight, targets, bias, ignore_index, "none", op, check_values=False)
    dispatch.check_kernel_dtype(op, "x", x, SUPPORTED_DTYPES)
    dispatch.check_saved(op, "grad_loss", grad_loss, targets.shape, "x", x, torch.float32)
    dispatch.check_saved(op, "lse", lse, (targets.numel(),), "x", x, torch.float32)
    with on_device_of(x):
        return cross_entropy_backward_none(grad_loss, x, weight, targets, bias, lse, ignore_index)


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, x, weight, targets, bias, lse, ignore_index):
    dbias = x.new_empty(weight.shape[:1]) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output):
    x, weight, targets, bias, ignore_index, reduction, compute_grads = inputs
    _, lse, dx, dweight, dbias = output
    ctx.mark_non_differentiable(lse, dx, dweight, dbias)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody uses
    ctx.reduction = reduction
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None
    ctx.compute_grads = compute_grads
    if reduction == "none":
        ctx.save_for_backward(x, weight, targets, bias, lse)
    else:
        ctx.save_for_backward(dx, dweight, dbias)


def _backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        x, weight, targets, bias, lse = ctx.saved_tensors
        dx, dweight, dbias = _linear_cross_entropy_backward_op(
            grad_loss, x, weight, targets, bias, lse, ctx.ignore_index
        )
    else:
        if not ctx.compute_grads:
            raise RuntimeError(
                "linear_cross_entropy: the forward ran with compute_grads=False, so it kept no gradients"
            )
        dx, dweight, dbias = (grad * grad_loss for grad in ctx.saved_tensors)
    return dx, dweight, None, dbias if ctx.has_bias else None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """The triton backend of fastgpt.linear_cross_entropy (arguments already validated by dispatch).
    Gradients are formed during the forward only when autograd will ask for them."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    loss, *_ = _linear_cross_entropy_op(x, weight, targets, bias, ignore_index, reduction, needs_grad)
    return loss


# ----------------------------------------------------------------------------------------------
# No-GPU compile check


def gpu_compile_cases(capability):
    """The chunk's GEMMs (logits with bias; split-K dx; accumulating dW^T with the bias row) in bf16 with
    the largest configuration, and the row kernel in its forward and 'none'-backward forms, at GPT-2
    small: a 4096-token chunk (8192 tokens run in two), C 768, and V 50257 (GPT-2's vocabulary: an odd
    width, in a logits buffer whose rows are padded to 50304) and 50304 (padded to a multiple of 64, as
    fastgpt.nn.GPT pads it)."""
    cases = []
    for vocab in (50257, 50304):
        cases += _vocab_compile_cases(capability, vocab)
    return cases


def _vocab_compile_cases(capability, vocab):
    rows, channels = 4096, 768

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def logits_gemm(dtype):
        return matmul_arguments(
            meta(rows, channels, dtype=dtype),
            meta(vocab, channels, dtype=dtype).t(),
            logits_buffer(rows, vocab, dtype, "meta"),
            bias=meta(vocab, dtype=dtype),
        )

    def dx_gemm(dtype):
        partial = meta(4, rows, channels, dtype=torch.float32)
        return matmul_arguments(
            logits_buffer(rows, vocab, dtype, "meta"), meta(vocab, channels, dtype=dtype), partial
        )

    def weight_gemm(dtype):
        accumulator = meta(vocab, channels, dtype=torch.float32)
        return matmul_arguments(
            meta(rows, channels, dtype=dtype).t(),
            logits_buffer(rows, vocab, dtype, "meta"),
            accumulator.t(),
            accumulate=accumulator.t(),
            bias_grad=meta(vocab, dtype=torch.float32),
        )

    cases = []
    for name, make in (
        (f"ce V={vocab} logits+bias", logits_gemm),
        (f"ce V={vocab} dx split-K", dx_gemm),
        (f"ce V={vocab} dW^T+=x^T dlogits, db", weight_gemm),
    ):
        cases += matmul_compile_cases(capability, name, make)
    logits, targets = logits_buffer(rows, vocab, torch.bfloat16, "meta"), meta(rows, dtype=torch.int64)
    per_row, kept = meta(rows, dtype=torch.float32), meta((), dtype=torch.int64)
    forms = {  # form: (losses, kept, row_scale, lse_given, scale)
        "forward mean": (per_row, kept, None, False, SCALE_MEAN.value),
        "backward none": (None, None, per_row, True, SCALE_PER_ROW.value),
    }
    for form, (losses, kept_count, row_scale, lse_given, scale) in forms.items():
        args = _rows_arguments(
            logits,
            targets,
            losses,
            per_row,
            kept_count,
            row_scale,
            -100,
            compute_loss=losses is not None,
            compute_grad=True,
            lse_given=lse_given,
            scale=scale,
        )
        name = f"cross_entropy_rows bf16 V={vocab} {form}"
        meta_args = {"BLOCK_V": BLOCK_V}
        cases.append(
            compile_case(name, cross_entropy_rows_kernel, args, meta_args, ROW_KERNEL_WARPS, 3, False)
        )
    return cases
