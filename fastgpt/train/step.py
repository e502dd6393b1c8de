"""How a training step runs: `fastgpt train --step-mode {auto,eager,compile,cuda-graph}`.

eager       the model's forward and backward as written, then AdamW (fused on CUDA).
compile     the model under torch.compile(fullgraph=True, dynamic=False): fastgpt's ops stay opaque
            custom operators and Inductor fuses the glue between them (embeddings, dropout, the loss
            scaling). AdamW stays eager: on CUDA the fused AdamW is already one multi-tensor kernel per
            parameter dtype, and compiling it (torch's `torch.compile(optimizer.step)` recipe) would
            recompile at every new learning rate unless the rate were a tensor. Under torchrun the
            model is compiled inside DDP (Dynamo cannot trace DDP's own forward with fullgraph=True)
            and its gradients are all-reduced by DDP's hooks. Dynamo sees that it runs inside DDP's
            forward and, with torch._dynamo.config.optimize_ddp at its default, hands the graph to
            DDPOptimizer, which splits it at DDP's bucket boundaries (one compiled graph per bucket), so
            that each bucket's all-reduce can start while the backward of the graphs before it runs.
cuda-graph  the whole step captured once in a CUDA graph and replayed, with each batch copied into static
            buffers: forward and backward of every micro-batch, the bf16 gradients cast into the float32
            master weights, clipping, AdamW(fused=True, capturable=True) with the learning rate in a
            device tensor (updated in place, so the graph reads each step's rate), and the weights copied
            back into the compute model. A replay costs the host one launch instead of one per kernel.
            The first WARMUP_STEPS steps run eagerly on a side stream (torch's recipe: lazy state such as
            AdamW's moments, Triton's autotuning and cuBLAS workspaces exists before capture); they are
            real training steps, so the run's result does not depend on the mode.
auto        on CPU: eager (fastgpt's C++ kernels do the work; Inductor's CPU code would not beat them and
            compiling costs tens of seconds). On CUDA: compile. cuda-graph should be faster on one GPU
            (one capture serves every step and removes the host time compile leaves), but it was
            written without a GPU: it becomes auto's choice there once its GPU tests
            (tests/test_train_step.py -m gpu) pass and `fastgpt bench --ops gpt` shows it ahead.

Dropout inside the CUDA graph: random ops draw from the default CUDA generator, which torch.cuda.graph
registers for capture (kernels read the philox seed and offset from device memory, and each replay
advances the generator's offset by the total the captured kernels consume), so every replay draws fresh
masks and torch.cuda.get_rng_state() keeps describing the stream. A non-default generator would have to
be registered with CUDAGraph.register_generator_state; fastgpt.nn uses nn.Dropout, i.e. the default one.
The masks are not bitwise those of an eager run with the same seed.
"""

import torch

from fastgpt.train.errors import UserError

STEP_MODES = ("auto", "eager", "compile", "cuda-graph")
WARMUP_STEPS = 3  # eager steps before the capture, as in torch's whole-network capture example


def choose_step_mode(requested, device, world_size=1):
    """(mode, reason): the step mode to run and why, for `requested` in STEP_MODES on `device` with
    `world_size` processes. Asking for cuda-graph off CUDA falls back to eager and says so; under
    torchrun it is refused (UserError)."""
    if not isinstance(requested, str):
        raise TypeError(f"step_mode must be a str, one of {STEP_MODES}, got {type(requested).__name__}")
    if requested not in STEP_MODES:
        raise ValueError(f"step_mode must be one of {STEP_MODES}, got {requested!r}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if not on_cuda:
            return "eager", (
                f"auto on {device.type}: fastgpt's CPU kernels do the work, and compiling would cost "
                "tens of seconds for little gain"
            )
        if world_size > 1:
            return "compile", (
                f"auto under torchrun ({world_size} processes): DDP's all-reduce is not captured in a "
                "CUDA graph, so the glue is fused by torch.compile instead"
            )
        return "compile", (
            "auto on CUDA: the glue between fastgpt's ops fused by torch.compile (not yet verified on a GPU, "
            "nor is --step-mode cuda-graph, which replays the whole step from a CUDA graph)"
        )
    if requested == "cuda-graph":
        if not on_cuda:
            return "eager", f"cuda-graph needs a CUDA device; running eager on {device.type}"
        if world_size > 1:
            raise UserError(
                f"--step-mode cuda-graph runs one process, got {world_size} under torchrun "
                "(DDP's all-reduce is not captured); use --step-mode compile or auto"
            )
    return requested, f"as asked: --step-mode {requested}"


def set_learning_rate(optimizer, lr):
    """Sets every group's rate: in place where it is a tensor (a captured graph reads that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def capture(step_fn, *static_inputs):
    """(graph, output): step_fn(*static_inputs) recorded into a CUDA graph; its kernels do not run.
    The tensors it allocates live in the graph's private memory pool, so output (and any gradient the
    step creates) is rewritten in place by every replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step_fn(*static_inputs)
    return graph, output


class CapturedStep:
    """A training step replayed from a CUDA graph.

    step_fn(*static_inputs) -> tensor runs one whole step (forward, backward, optimizer step) reading its
    batch from static_inputs only, and leaves no state behind that the next call depends on other than
    the parameters, gradients and optimizer state it updates in place. Calling the CapturedStep with a
    new batch copies it into static_inputs, then: for the first warmup_steps calls runs step_fn eagerly
    on a side stream; at the next call captures it, and from then on replays the graph. Returns
    step_fn's output (after a replay, the graph's static output: read it before the next call)."""

    def __init__(self, step_fn, static_inputs=(), warmup_steps=WARMUP_STEPS):
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedStep needs a CUDA device: torch sees no CUDA GPU")
        for index, tensor in enumerate(static_inputs):
            if not (isinstance(tensor, torch.Tensor) and tensor.is_cuda):
                raise TypeError(f"static_inputs[{index}] must be a CUDA tensor, got {tensor!r:.80}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.step_fn, self.static_inputs, self.warmup_steps = step_fn, tuple(static_inputs), warmup_steps
        self.calls = 0
        self.graph = self.output = None

    @property
    def captured(self):
        return self.graph is not None

    def pool_bytes(self):
        """Bytes of GPU memory the captured graph's private pool holds (its activations, gradients and
        other temporaries, kept between replays), or 0 before the capture."""
        if self.graph is None:
            return 0
        pool = tuple(self.graph.pool())
        segments = torch.cuda.memory._snapshot()["segments"]
        return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == pool)

    def __call__(self, *inputs):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} input tensor(s), got {len(inputs)}")
        for static, given in zip(self.static_inputs, inputs):
            static.copy_(given, non_blocking=True)
        self.calls += 1
        if self.calls <= self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                output = self.step_fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            return output
        if self.graph is None:
            self.graph, self.output = capture(self.step_fn, *self.static_inputs)
        self.graph.replay()
        return self.output
