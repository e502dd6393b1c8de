"""`fastgpt train`: pretrain a GPT on text, fine-tune one from a checkpoint, or resume a run.

fastgpt train                                    # a tiny GPT on the standard library's sources
fastgpt train --data notes/ --steps 2000 --out runs/notes
fastgpt train --init ./gpt2 --data book.txt --lr 3e-5 --steps 200   # fine-tune a local HF GPT-2
fastgpt train --out runs/notes --steps 4000 --resume
torchrun --nproc_per_node 2 -m fastgpt train ...  # DDP: gloo on CPU; nccl on GPUs, not yet run
fastgpt train --step-mode compile                # eager | compile | cuda-graph; auto says which it picks
"""

import torch
from rich.console import Console

from fastgpt.nn import GPT, GPTConfig
from fastgpt.nn.config import PRESETS
from fastgpt.train import checkpoint, runtime
from fastgpt.train.data import TokenData, data_splits, read_data
from fastgpt.train.errors import UserError
from fastgpt.train.loop import Settings, Trainer, fit
from fastgpt.train.step import STEP_MODES, choose_step_mode
from fastgpt.train.tokenizer import load_tokenizer

# --n-layer and friends: GPTConfig fields a new model may override on its preset.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "n_kv_head")


def add_arguments(parser):
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        help="a text file or a directory of text files (default: the standard library's .py files), or token "
        "ids: a directory with nanoGPT's train.bin and val.bin or llm.c's *train*.bin and *val*.bin shards, or "
        "one .bin file (with --tokenizer)",
    )
    data.add_argument(
        "--tokenizer", help="'byte' (default for new models) or a tokenizer.json / vocab.json+merges.txt path"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--config", choices=tuple(PRESETS), help="architecture of a new model (default: tiny)")
    for field in ARCHITECTURE_FIELDS:
        model.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the preset's {field}")
    model.add_argument("--dropout", type=float, help="dropout of a new or initialised model (default: 0)")
    model.add_argument(
        "--init",
        metavar="DIR",
        help="start from this fastgpt checkpoint, local HF GPT-2 directory or nanoGPT out_dir (ckpt.pt)",
    )
    model.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default: 1000)")
    optim.add_argument(
        "--batch-size", type=int, default=16, help="sequences per step, over all processes (default: 16)"
    )
    optim.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per process per step (default: 1)"
    )
    optim.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: the model's context window)"
    )
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    optim.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default: lr / 10)")
    optim.add_argument("--warmup", type=int, help="linear warmup steps (default: min(100, steps / 10))")
    optim.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW decay of 2-D weights (default: 0.1)"
    )
    optim.add_argument(
        "--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default: 1.0)"
    )
    optim.add_argument(
        "--seed", type=int, default=1337, help="seed of the weights, batches and dropout (default: 1337)"
    )
    optim.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each block's input for the backward, which recomputes the rest: much less activation "
        "memory (a bigger model or batch fits) for about one more forward pass",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/train", help="checkpoint directory (default: ./runs/train)")
    run.add_argument(
        "--eval-every", type=int, default=100, help="evaluate and checkpoint every K steps (default: 100)"
    )
    run.add_argument(
        "--eval-windows", type=int, default=64, help="held-out sequences per evaluation (default: 64)"
    )
    run.add_argument(
        "--step-mode",
        choices=STEP_MODES,
        default="auto",
        help="how each step runs: eager, torch.compile (fullgraph), or the whole step replayed from a CUDA "
        "graph (auto: compile on GPUs, eager on CPU; compile and cuda-graph have not yet run on a GPU, and "
        "cuda-graph is opt-in until it has)",
    )
    runtime.add_arguments(run)


def build_model(args, device, token_ids):
    """(float32 GPT on device, tokenizer) for a new, an initialised or a resumed run. token_ids: --data holds
    token ids, which come with the tokenizer that made them: a new model needs --tokenizer (its
    vocabulary sizes the model)."""
    if args.resume and (args.init or args.config):
        raise UserError("--resume continues the checkpoint in --out; drop --init and --config")
    if args.init and args.config:
        raise UserError("--init loads its architecture from the checkpoint; drop --config")
    architecture = [f"--{f.replace('_', '-')}" for f in ARCHITECTURE_FIELDS if getattr(args, f) is not None]
    if architecture and (args.init or args.resume):
        raise UserError(
            f"{', '.join(architecture)} shape a new model; --init and --resume load the checkpoint's"
        )
    if args.resume and args.tokenizer:
        raise UserError("--resume continues with the checkpoint's tokenizer; drop --tokenizer")
    overrides = {"dropout": args.dropout} if args.dropout is not None else {}
    source = args.out if args.resume else args.init
    if source:
        model, tokenizer = checkpoint.load_model(
            source, device=device, dtype=torch.float32, backend=args.backend, **overrides
        )
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise UserError(f"{source} holds no tokenizer files; pass --tokenizer byte or a tokenizer path")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {model.config.vocab_size}"
            )
        return model, tokenizer
    if token_ids and not args.tokenizer:
        raise UserError(
            f"--data {args.data} holds token ids: pass --tokenizer, the tokenizer that made them (GPT-2's: a "
            "directory with its vocab.json and merges.txt), or --init a model directory that holds it"
        )
    tokenizer = load_tokenizer(args.tokenizer or "byte")
    fields = {
        field: getattr(args, field) for field in ARCHITECTURE_FIELDS if getattr(args, field) is not None
    }
    if args.seq_len:
        fields["block_size"] = args.seq_len
    try:
        config = GPTConfig.preset(
            args.config or "tiny",
            vocab_size=tokenizer.vocab_size,
            backend=args.backend,
            **fields,
            **overrides,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    return GPT(config).to(device), tokenizer


def run(args):
    env = runtime.start(args.device, args.dtype)
    try:
        return train(args, env)
    finally:
        runtime.stop(env)


def train(args, env):
    console = Console(quiet=not env.is_main, soft_wrap=True)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    data = read_data(args.data)
    model, tokenizer = build_model(args, env.device, token_ids=isinstance(data, TokenData))
    seq_len = args.seq_len or model.config.block_size
    settings = Settings(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=seq_len, lr=args.lr,
        min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_windows=args.eval_windows, seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    train_tokens, val_tokens, data_name = data_splits(data, tokenizer, seq_len)
    step_mode, step_reason = choose_step_mode(args.step_mode, env.device, env.world_size)
    trainer = Trainer(
        model, tokenizer, train_tokens, val_tokens, settings, env, data_name=data_name, step_mode=step_mode
    )
    if args.resume:
        trainer.resume(args.out)
        if trainer.step >= settings.steps:
            raise UserError(
                f"the checkpoint in {args.out} is at step {trainer.step} already; raise --steps to go on"
            )
    config = model.config
    console.print(
        f"[bold]fastgpt train[/bold]: {model.num_params() / 1e6:.2f}M parameters "
        f"({config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context {config.block_size}) "
        f"on {env.device} in {str(env.dtype).replace('torch.', '')}, backend {config.backend}, "
        f"{env.world_size} process(es)\n"
        f"data: {data_name}: {len(train_tokens):,} training and {len(val_tokens):,} held-out tokens "
        f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens)\n"
        f"{settings.steps} steps of {settings.batch_size} x {seq_len} tokens"
        + (f", resuming at step {trainer.step}" if args.resume else "")
        + f"\nstep mode: {step_mode} ({step_reason})"
        + (", activation checkpointing" if settings.activation_checkpointing else "")
    )
    try:
        tokens_per_s = fit(trainer, args.out, console)
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are renamed into place whole, so the last one is intact
        if trainer.saved_step is None:
            console.print(f"interrupted at step {trainer.step}, before the first checkpoint")
        else:
            console.print(
                f"interrupted at step {trainer.step}; the checkpoint of step {trainer.saved_step} in {args.out} is intact"
            )
        return 130
    final = trainer.evals[-1]
    console.print(
        f"done: held-out loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
        f"{tokens_per_s:,.0f} training tokens/s; checkpoint in {args.out}"
    )
    return 0
