"""`fastgpt generate PROMPT --checkpoint DIR`: sample a continuation with the KV-cache generate and print
it as it is produced. Several prompts (`generate A B C`, or --prompts-file with one per line) and
--num-samples N are generated as one batch, prompts of different lengths together, and printed when
done. DIR is a `fastgpt train` checkpoint or a local transformers GPT-2 directory."""

import sys

import torch

from fastgpt.nn.generation import check_generate_arguments
from fastgpt.train import checkpoint, runtime
from fastgpt.train.errors import UserError
from fastgpt.train.tokenizer import StreamDecoder

# New tokens by default; for prompts of different lengths at most what the context window has room for
# after the longest (only a batch of equal lengths goes on past the window).
DEFAULT_NEW_TOKENS = 256
SAMPLE_SEPARATOR = "-" * 15  # the line after each of several samples, as nanoGPT's sample.py prints


def add_arguments(parser):
    parser.add_argument(
        "prompt",
        nargs="*",
        help="the text to continue ('' starts a new document); several are generated as one batch",
    )
    parser.add_argument(
        "--prompts-file",
        help="a text file of prompts, one per line, generated as one batch after any given as arguments",
    )
    checkpoint.add_source_arguments(parser)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default: {DEFAULT_NEW_TOKENS}; past the context window each token is predicted from the last "
        "block_size tokens, as in nanoGPT (prompts of different lengths must fit the window)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument(
        "--top-p", type=float, help="sample within the smallest set of tokens of this probability"
    )
    parser.add_argument("--seed", type=int, default=1337, help="torch seed of the sampling (default: 1337)")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="continuations of each prompt, generated as one batch (default: 1; one prompt's one "
        "continuation is streamed as it is produced)",
    )
    runtime.add_arguments(parser, dtypes=("auto", "float32", "bfloat16", "float16"))


def encode_prompt(tokenizer, prompt, block_size, vocab_size):
    """The prompt's token ids; an empty prompt is the end-of-text token, which starts a document.

    The ids, and the end-of-text id that generation stops at, must have rows in the model's vocabulary
    (a tokenizer other than the model's may give larger ones). Checked here, on the host, because the
    model does not read the ids of a CUDA tensor (dispatch.check_index_range: only with FASTGPT_DEBUG=1),
    and its embedding would stop the process with a device-side assert."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise UserError("the prompt is empty and this tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eot_id]
    largest = max(ids if tokenizer.eot_id is None else [*ids, tokenizer.eot_id])
    if largest >= vocab_size:
        raise UserError(
            f"the tokenizer produces ids up to {largest}, beyond the model's vocab_size {vocab_size}: "
            "pass the tokenizer the model was trained with"
        )
    if len(ids) >= block_size:
        raise UserError(
            f"the prompt is {len(ids)} tokens, too long for the model's context window of {block_size} tokens "
            "(it must hold the prompt and at least one new token)"
        )
    return ids


def stream(model, tokenizer, ids, *, max_new_tokens, temperature=0.8, top_k=None, top_p=None, out=None):
    """Generates after ids, writing the decoded text to out (stdout) as the tokens come; returns all the ids."""
    out = out or sys.stdout
    decoder = StreamDecoder(tokenizer)

    def write_tokens(next_token):  # (1,)
        out.write(decoder.push(next_token.tolist()))
        out.flush()

    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)  # (1, T)
    result = model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eot_id,
        callback=write_tokens,
    )  # fmt: skip
    out.write(decoder.flush() + "\n")
    out.flush()
    return result[0].tolist()


def sample_batch(
    model, tokenizer, prompts_ids, num_samples, *, max_new_tokens, temperature=0.8, top_k=None, top_p=None
):
    """num_samples continuations of each prompt (a list of token id lists, of any lengths), generated as one
    batch: prompt 0's samples first. Returns each one's new token ids, up to and including its first
    end-of-text token (generate repeats that token after it)."""
    device = next(model.parameters()).device
    rows = [ids for ids in prompts_ids for _ in range(num_samples)]
    if len({len(ids) for ids in rows}) == 1:  # equal lengths: the (B, T) batch
        idx = torch.tensor(rows, device=device)
    else:  # a list of prompts: each continues from its own length
        idx = [torch.tensor(ids, device=device) for ids in rows]
    result = model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eot_id
    )
    samples = []
    for ids, row in zip(rows, result):
        new = row[len(ids) :].tolist()
        if tokenizer.eot_id in new:
            new = new[: new.index(tokenizer.eot_id) + 1]
        samples.append(new)
    return samples


def read_prompts(args):
    """The prompts: the arguments', then --prompts-file's lines (without their line ends)."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as file:
                prompts += file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {error}") from None
    if not prompts:
        raise UserError("give a prompt to continue, or --prompts-file ('' starts a new document)")
    return prompts


def run(args):
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    device = runtime.resolve_device(args.device)
    dtype = runtime.resolve_dtype(args.dtype, device, choices=("auto", "float32", "bfloat16", "float16"))
    model, tokenizer = checkpoint.load_model_and_tokenizer(
        args.checkpoint, args.tokenizer, device=device, dtype=dtype, backend=args.backend
    )
    block_size = model.config.block_size
    prompts = read_prompts(args)
    prompts_ids = [
        encode_prompt(tokenizer, prompt, block_size, model.config.vocab_size) for prompt in prompts
    ]
    longest = max(len(ids) for ids in prompts_ids)
    equal_lengths = len({len(ids) for ids in prompts_ids}) == 1
    if args.max_new_tokens is None:
        args.max_new_tokens = (
            DEFAULT_NEW_TOKENS if equal_lengths else min(DEFAULT_NEW_TOKENS, block_size - longest)
        )
    if not equal_lengths and longest + args.max_new_tokens > block_size:
        raise UserError(
            f"the longest prompt ({longest} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the "
            f"model's context window of {block_size} tokens (only prompts of one length go on past it)"
        )
    try:
        check_generate_arguments(
            torch.zeros(1, longest, dtype=torch.long), args.max_new_tokens, args.temperature, args.top_k, args.top_p, tokenizer.eot_id,
            block_size=block_size, vocab_size=model.config.vocab_size,
        )  # fmt: skip
    except ValueError as error:  # bad --temperature, --top-k, --top-p or --max-new-tokens
        raise UserError(str(error).replace("GPT.generate: ", "")) from None
    torch.manual_seed(args.seed)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.num_samples == 1 and len(prompts) == 1:
        sys.stdout.write(prompts[0])
        stream(model, tokenizer, prompts_ids[0], max_new_tokens=args.max_new_tokens, **sampling)
        return 0
    samples = sample_batch(
        model, tokenizer, prompts_ids, args.num_samples, max_new_tokens=args.max_new_tokens, **sampling
    )
    for prompt, sample in zip([p for p in prompts for _ in range(args.num_samples)], samples):
        sys.stdout.write(f"{prompt}{tokenizer.decode(sample)}\n{SAMPLE_SEPARATOR}\n")
    sys.stdout.flush()
    return 0
