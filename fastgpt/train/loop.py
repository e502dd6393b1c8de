"""The training loop, in nanoGPT's shape: AdamW with weight decay on matrices only, linear warmup then
cosine decay, gradient clipping and accumulation, periodic held-out evaluation, and DDP.

Mixed precision: fastgpt's GPT runs its fused ops in the dtype of its parameters (it refuses
torch.autocast). For bfloat16 the Trainer keeps two copies: the float32 model, which the optimizer
updates and checkpoints hold, and a bfloat16 copy that computes the forward and backward passes.
Gradients are cast up into the float32 model before clipping and the step, and the updated weights
cast back down after it. In float32 the two are one model.

How the step runs (eager, under torch.compile, or replayed from a CUDA graph) is fastgpt.train.step's.
"""

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.nn.parallel import DistributedDataParallel

from fastgpt.nn.model import IGNORE_INDEX
from fastgpt.nn.weights import VOCAB_ROW_TENSORS, append_zero_rows, has_rows
from fastgpt.train import checkpoint
from fastgpt.train.data import BatchSampler, eval_starts, windows
from fastgpt.train.errors import UserError
from fastgpt.train.step import STEP_MODES, CapturedStep, set_learning_rate


@dataclass
class Settings:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, summed over processes and accumulation
    grad_accum: int = 1  # micro-batches per process per step
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # the end of the cosine; None is lr / 10 (nanoGPT's choice)
    warmup: int | None = None  # None is min(100, steps // 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: int = 100
    eval_windows: int = 64  # held-out windows of seq_len tokens per evaluation
    seed: int = 1337
    # Recompute each block in the backward instead of keeping its activations (GPT.set_activation_checkpointing).
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.warmup is None:
            self.warmup = min(100, self.steps // 10)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_windows"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.warmup < 0 or self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(
                f"need --lr > 0 and --warmup, --min-lr, --weight-decay, --grad-clip >= 0, got lr={self.lr}, "
                f"warmup={self.warmup}, min_lr={self.min_lr}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )


def learning_rate(step, settings):
    """Linear warmup over `warmup` steps to lr, then a cosine down to min_lr at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = min(1.0, (step - settings.warmup) / max(1, settings.steps - settings.warmup))
    return settings.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (settings.lr - settings.min_lr)


def parameter_groups(model, weight_decay):
    """nanoGPT's rule: every parameter with 2+ dimensions (the Linear weights and the embeddings) is
    decayed; biases and LayerNorm weights are not. A tied LM head is one parameter, listed once."""
    named = list(model.named_parameters())
    decayed = [(n, p) for n, p in named if p.dim() >= 2]
    kept = [(n, p) for n, p in named if p.dim() < 2]
    return [
        {"params": [p for _, p in decayed], "names": [n for n, _ in decayed], "weight_decay": weight_decay},
        {"params": [p for _, p in kept], "names": [n for n, _ in kept], "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(model, tokens, starts, seq_len, batch_size, runtime, first_scored=None):
    """Mean next-token loss of model over the windows at `starts` (shared out over the processes).
    first_scored: None (every target of every window), or (N,) int64, the first target of each window
    that counts (ShardedTokens.strided_windows: overlapping windows that score each token once)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # (loss sum, token count)
    mine = slice(runtime.rank, None, runtime.world_size)
    scored_from = torch.zeros_like(starts) if first_scored is None else first_scored
    for chunk, chunk_scored_from in zip(starts[mine].split(batch_size), scored_from[mine].split(batch_size)):
        inputs, targets = windows(tokens, chunk, seq_len, model.config.vocab_size)  # (n, seq_len) each
        targets = targets.masked_fill(torch.arange(seq_len) < chunk_scored_from[:, None], IGNORE_INDEX)
        scored = int((targets != IGNORE_INDEX).sum())
        loss = model(inputs.to(runtime.device), targets.to(runtime.device))  # the mean over the scored
        totals[0] += loss.double() * scored
        totals[1] += scored
    if runtime.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


class Trainer:
    """Owns the model copies, the optimizer, the batches and the progress of one run.

    model: a float32 GPT on runtime.device (the weights the optimizer updates and checkpoints store).
    step_mode: "eager", "compile" or "cuda-graph" (fastgpt.train.step; choose_step_mode resolves "auto")."""

    def __init__(
        self,
        model,
        tokenizer,
        train_tokens,
        val_tokens,
        settings,
        runtime,
        *,
        data_name="",
        step_mode="eager",
    ):
        if step_mode not in STEP_MODES[1:]:
            raise ValueError(f"step_mode must be one of {STEP_MODES[1:]}, got {step_mode!r}")
        if step_mode == "cuda-graph" and runtime.device.type != "cuda":
            raise ValueError(f"step_mode 'cuda-graph' needs a CUDA device, got {runtime.device}")
        if step_mode == "cuda-graph" and runtime.distributed:
            raise UserError("--step-mode cuda-graph runs one process; use --step-mode compile under torchrun")
        if step_mode == "cuda-graph" and settings.activation_checkpointing and model.config.dropout > 0:
            raise UserError(
                "--activation-checkpointing with dropout cannot run in --step-mode cuda-graph: recomputing a "
                "block's dropout masks needs the CUDA random state saved in its forward, which torch cannot read "
                "during a CUDA graph capture; use --step-mode compile or --dropout 0"
            )
        per_step = runtime.world_size * settings.grad_accum
        if settings.batch_size % per_step:
            raise UserError(
                f"--batch-size {settings.batch_size} must be divisible by processes x --grad-accum = {per_step}"
            )
        if settings.seq_len > model.config.block_size:
            raise UserError(
                f"--seq-len {settings.seq_len} exceeds the model's context window {model.config.block_size}"
            )
        self.model, self.tokenizer, self.settings, self.runtime = model, tokenizer, settings, runtime
        self.data_name = data_name
        self.compute_model = (
            model if runtime.dtype == torch.float32 else copy.deepcopy(model).to(runtime.dtype)
        )
        self.compute_model.train()
        self.compute_model.set_activation_checkpointing(settings.activation_checkpointing)
        # what the training step calls; compiled inside DDP, as Dynamo cannot trace DDP's own forward
        # with fullgraph=True
        self.wrapped = (
            torch.compile(self.compute_model, fullgraph=True, dynamic=False)
            if step_mode == "compile"
            else self.compute_model
        )
        if runtime.distributed:
            device_ids = [runtime.device] if runtime.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.wrapped, device_ids=device_ids)
        self.param_groups = parameter_groups(model, settings.weight_decay)
        self.step_mode = step_mode
        graphed = step_mode == "cuda-graph"
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in self.param_groups],
            # a captured step reads the rate from device memory, which set_learning_rate updates in place
            lr=torch.tensor(settings.lr, device=runtime.device) if graphed else settings.lr,
            betas=(settings.beta1, settings.beta2),
            fused=runtime.device.type == "cuda",
            capturable=graphed,
        )
        self.run_step = self._step_runner(step_mode)
        self.sampler = BatchSampler(train_tokens, settings.seq_len, settings.seed, model.config.vocab_size)
        self.val_tokens = val_tokens
        self.eval_starts = eval_starts(val_tokens, settings.seq_len, settings.eval_windows)
        self.step = 0
        self.history = []  # one {"step", "loss", "lr"} per optimizer step
        self.evals = []  # one {"step", "loss", "perplexity"} per evaluation
        self.saved_step = None  # the step of the latest checkpoint in the output directory
        torch.manual_seed(settings.seed + runtime.rank)  # dropout masks differ between processes

    @property
    def tokens_per_step(self):
        return self.settings.batch_size * self.settings.seq_len

    @property
    def untimed_steps(self):
        """Steps that warm up rather than train at speed, which fit leaves out of its tokens/s: the
        first (compilation, allocator and autotuning caches), and with a captured step also its eager
        warm-up steps and the capture."""
        if isinstance(self.run_step, CapturedStep):
            return self.run_step.warmup_steps + 1
        return 1

    def process_batch(self):
        """This process's (inputs, targets) of the next global batch, (rows, T) each, on the CPU."""
        inputs, targets = self.sampler.global_batch(self.settings.batch_size)  # (B, T) each
        rows = self.settings.batch_size // self.runtime.world_size
        mine = slice(self.runtime.rank * rows, (self.runtime.rank + 1) * rows)
        return inputs[mine], targets[mine]

    def _step_runner(self, step_mode):
        """run(inputs, targets) -> this process's mean loss (a 0-dim device tensor): one whole step in
        step_mode (fastgpt.train.step) on this process's batch (CPU tensors, (rows, T) each)."""
        device = self.runtime.device
        if step_mode != "cuda-graph":  # eager, or compile: self.wrapped is the compiled model then
            return lambda inputs, targets: self._whole_step(inputs.to(device), targets.to(device))
        rows = self.settings.batch_size // self.runtime.world_size
        static_batch = [
            torch.zeros(rows, self.settings.seq_len, dtype=torch.long, device=device) for _ in range(2)
        ]  # (rows, T) inputs and targets
        return CapturedStep(self._whole_step, static_batch)

    def _whole_step(self, inputs, targets):
        """Forward and backward of each micro-batch of (inputs, targets) ((rows, T) each, on the device),
        then the optimizer step; returns this process's mean loss, a 0-dim tensor."""
        accum = self.settings.grad_accum
        total = torch.zeros((), device=self.runtime.device)
        for i, (micro_inputs, micro_targets) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
            # DDP all-reduces the gradients in the backward of the last micro-batch only.
            last = i == accum - 1
            with nullcontext() if last or not self.runtime.distributed else self.wrapped.no_sync():
                loss = self.wrapped(micro_inputs, micro_targets) / accum
                loss.backward()
            total += loss.detach()
        self._optimizer_step()
        return total

    def train_step(self):
        """One optimizer step on one global batch; returns its mean loss over all processes."""
        lr = learning_rate(self.step, self.settings)
        set_learning_rate(self.optimizer, lr)
        total = self.run_step(*self.process_batch())
        if self.runtime.distributed:
            dist.all_reduce(total)
            total /= self.runtime.world_size
        self.step += 1
        loss = total.item()
        self.history.append({"step": self.step, "loss": loss, "lr": lr})
        return loss

    def _optimizer_step(self):
        separate = self.compute_model is not self.model
        if separate:
            for master, compute in zip(self.model.parameters(), self.compute_model.parameters()):
                master.grad = compute.grad.float()
                compute.grad = None
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if separate:
            with torch.no_grad():
                for master, compute in zip(self.model.parameters(), self.compute_model.parameters()):
                    compute.copy_(master)

    def evaluate(self):
        loss = evaluate(
            self.compute_model, self.val_tokens, self.eval_starts, self.settings.seq_len,
            self.settings.batch_size, self.runtime,
        )  # fmt: skip
        self.evals.append({"step": self.step, "loss": loss, "perplexity": math.exp(min(loss, 700.0))})
        return loss

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def trainer_state(self):
        return {
            "step": self.step,
            "settings": asdict(self.settings),
            "world_size": self.runtime.world_size,
            "dtype": str(self.runtime.dtype).replace("torch.", ""),
            "data": self.data_name,
            "tokens_seen": self.step * self.tokens_per_step,
            "history": self.history,
            "evals": self.evals,
        }

    def state_tensors(self):
        """AdamW's moments and step per parameter name, and the RNG states of every process."""
        tensors = {}
        vocab_size = self.model.config.vocab_size
        for group in self.param_groups:
            for name, parameter in zip(group["names"], group["params"]):
                for key, value in self.optimizer.state.get(parameter, {}).items():
                    if name in VOCAB_ROW_TENSORS and value.dim() == 2:
                        value = value[:vocab_size]  # (vocab_size, C): checkpoints hold no padded rows
                    tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng.data"] = self.sampler.state()
        generators = {"torch": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            generators["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        for key, state in generators.items():
            for rank, part in enumerate(self._gather(state)):
                tensors[f"rng.{key}.rank{rank}"] = part
        return tensors

    def optimizer_moment(self, name, value):
        """A checkpoint's optimizer state tensor for parameter `name` as the optimizer holds it: the
        moments of a vocabulary tensor, saved with vocab_size rows, get zero padded rows again."""
        config = self.model.config
        if name in VOCAB_ROW_TENSORS and has_rows(value, config.vocab_size):
            return append_zero_rows(value, config.padded_vocab_size)  # (padded_vocab_size, C)
        return value

    def _gather(self, state):
        """Every process's copy of a uint8 state tensor (all processes must call this)."""
        if not self.runtime.distributed:
            return [state]
        comm_device = self.runtime.device if self.runtime.device.type == "cuda" else "cpu"  # nccl needs CUDA
        parts = [torch.empty_like(state, device=comm_device) for _ in range(self.runtime.world_size)]
        dist.all_gather(parts, state.to(comm_device))
        return [part.cpu() for part in parts]

    def save(self, directory):
        """Writes a training checkpoint (all processes call this; the first one writes)."""
        tensors = self.state_tensors()
        if self.runtime.is_main:
            checkpoint.save_training_checkpoint(
                directory, self.model, self.tokenizer, tensors, self.trainer_state()
            )
        self.saved_step = self.step

    def resume(self, directory):
        """Continues from the checkpoint in directory; the model's weights were loaded with it."""
        trainer_state, tensors = checkpoint.load_training_state(directory)
        self.step = self.saved_step = trainer_state["step"]
        self.history, self.evals = trainer_state.get("history", []), trainer_state.get("evals", [])
        optimizer_state = self.optimizer.state_dict()
        index = 0
        for group in self.param_groups:
            for name in group["names"]:
                prefix = f"optimizer.{name}."
                state = {
                    key[len(prefix) :]: self.optimizer_moment(name, value)
                    for key, value in tensors.items()
                    if key.startswith(prefix)
                }
                if state:
                    optimizer_state["state"][index] = state
                index += 1
        self.optimizer.load_state_dict(optimizer_state)
        self.sampler.load_state(tensors["rng.data"])
        rank = self.runtime.rank
        if f"rng.torch.rank{rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
        else:  # more processes than the checkpoint had: a fresh, still reproducible stream
            torch.manual_seed(self.settings.seed + rank + 7919 * self.step)
        if self.runtime.device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], self.runtime.device)


# ----------------------------------------------------------------------------------------------
# The loop, with a progress bar


def progress_bar(console):
    """A rich progress bar showing the step, loss, tokens/s, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tokens_per_s]:>9,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def fit(trainer, out_dir, console):
    """Trains to settings.steps, evaluating and checkpointing every eval_every steps and at the end.
    Returns the mean training tokens/s. Every process runs this; give the others a quiet console."""
    settings = trainer.settings
    if trainer.step == 0:
        loss = trainer.evaluate()
        console.print(f"step 0: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}")
    last_untimed_step = trainer.step + trainer.untimed_steps  # left out of the mean if there are others
    timed_seconds, timed_steps, all_seconds, all_steps = 0.0, 0, 0.0, 0
    with progress_bar(console) as progress:
        task = progress.add_task(
            "train", total=settings.steps, completed=trainer.step, loss=float("nan"), tokens_per_s=0.0
        )
        while trainer.step < settings.steps:
            started = time.perf_counter()
            loss = trainer.train_step()  # returns a Python float: the step's work has finished
            seconds = time.perf_counter() - started
            all_seconds, all_steps = all_seconds + seconds, all_steps + 1
            if trainer.step > last_untimed_step:
                timed_seconds, timed_steps = timed_seconds + seconds, timed_steps + 1
            progress.update(task, advance=1, loss=loss, tokens_per_s=trainer.tokens_per_step / seconds)
            if trainer.step % settings.eval_every == 0 or trainer.step == settings.steps:
                eval_loss = trainer.evaluate()
                trainer.save(out_dir)
                progress.console.print(
                    f"step {trainer.step}: train loss {loss:.4f}, held-out loss {eval_loss:.4f}, "
                    f"perplexity {math.exp(min(eval_loss, 700.0)):.2f}; checkpoint saved to {out_dir}"
                )
    if not timed_steps:  # a run no longer than its warm-up: its every step
        timed_seconds, timed_steps = all_seconds, all_steps
    return trainer.tokens_per_step * timed_steps / timed_seconds if timed_steps else 0.0
