"""`fastgpt eval --checkpoint DIR [--data ...]`: the loss and perplexity of a checkpoint on the held-out
split of the data (the same split `fastgpt train` holds out), in non-overlapping windows spread over it,
or with --stride in overlapping windows that score every held-out token once, each with at least
seq_len - stride tokens of context (transformers' sliding-window perplexity)."""

import math

from rich.console import Console

from fastgpt.train import checkpoint, runtime
from fastgpt.train.data import as_shards, data_splits, eval_starts, read_data
from fastgpt.train.errors import UserError
from fastgpt.train.loop import evaluate


def add_arguments(parser):
    checkpoint.add_source_arguments(parser)
    parser.add_argument(
        "--data",
        help="a text file or a directory of text files (default: the standard library's .py files), or token "
        "ids: a directory with nanoGPT's train.bin and val.bin or llm.c's shards (the val files are scored), or "
        "one .bin file",
    )
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the model's context window)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument(
        "--max-windows",
        type=int,
        default=512,
        help="score at most this many windows, spread evenly (default: 512; with --stride, all of them)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="slide windows by this many tokens and score each held-out token once, with at least seq_len - "
        "stride tokens of context (transformers' perplexity recipe; GPT-2's published numbers use 512)",
    )
    runtime.add_arguments(parser, dtypes=("auto", "float32", "bfloat16", "float16"))


def run(args):
    device = runtime.resolve_device(args.device)
    dtype = runtime.resolve_dtype(args.dtype, device, choices=("auto", "float32", "bfloat16", "float16"))
    model, tokenizer = checkpoint.load_model_and_tokenizer(
        args.checkpoint, args.tokenizer, device=device, dtype=dtype, backend=args.backend
    )
    seq_len = args.seq_len or model.config.block_size
    if not 1 <= seq_len <= model.config.block_size:
        raise UserError(
            f"--seq-len must be in [1, {model.config.block_size}] (the context window), got {seq_len}"
        )
    if args.batch_size < 1 or args.max_windows < 1:
        raise UserError(
            f"--batch-size and --max-windows must be at least 1, got {args.batch_size}, {args.max_windows}"
        )
    if args.stride is not None and not 1 <= args.stride <= seq_len:
        raise UserError(f"--stride must be in [1, {seq_len}] (the window), got {args.stride}")
    _, val_tokens, data_name = data_splits(read_data(args.data), tokenizer, seq_len)  # ids checked per window
    env = runtime.Runtime(device, dtype)
    if args.stride is None:
        starts = eval_starts(val_tokens, seq_len, args.max_windows)
        loss = evaluate(model, val_tokens, starts, seq_len, args.batch_size, env)
        scored = f"{len(starts) * seq_len:,} of {len(val_tokens):,} held-out tokens, {len(starts)} windows of {seq_len}"
    else:
        starts, first_scored = as_shards(val_tokens).strided_windows(seq_len, args.stride)
        loss = evaluate(model, val_tokens, starts, seq_len, args.batch_size, env, first_scored)
        scored = (
            f"{int((seq_len - first_scored).sum()):,} of {len(val_tokens):,} held-out tokens, {len(starts)} windows "
            f"of {seq_len} every {args.stride}: after the first, each token with {seq_len - args.stride}+ of context"
        )
    Console(soft_wrap=True).print(
        f"held-out loss {loss:.4f}, perplexity {math.exp(min(loss, 700.0)):.3f} "
        f"({scored}; {data_name}; {tokenizer.kind} tokenizer)"
    )
    return 0
