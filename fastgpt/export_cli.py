"""`fastgpt export --checkpoint DIR --out HF_DIR`: a checkpoint as a transformers GPT-2 directory, which
`GPT2LMHeadModel.from_pretrained(HF_DIR)` loads into a model computing the same logits (see
fastgpt.nn.GPT.save_hf), with the checkpoint's tokenizer files beside it: a BPE tokenizer's
tokenizer.json loads with `AutoTokenizer.from_pretrained(HF_DIR)`; the byte and character tokenizers,
which transformers has no class for, keep fastgpt's tokenizer_info.json, so fastgpt's own commands still
read the directory whole."""

import os

import torch

from fastgpt.nn.weights import write_files
from fastgpt.train import checkpoint
from fastgpt.train.errors import UserError
from fastgpt.train.tokenizer import load_tokenizer

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser):
    checkpoint.add_source_arguments(parser)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="the transformers GPT-2 directory to write"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(EXPORT_DTYPES),
        default="float32",
        help="the weights' dtype in the export (default: float32; bfloat16 or float16 halve the file)",
    )


def run(args):
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise UserError(
            f"--out must be another directory than --checkpoint: the export's config.json would replace the "
            f"checkpoint's, got {args.out} for both"
        )
    model, tokenizer = checkpoint.load_model(args.checkpoint, device="cpu", dtype=EXPORT_DTYPES[args.dtype])
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    model.save_hf(args.out, eos_token_id=tokenizer.eot_id if tokenizer is not None else None)
    if tokenizer is not None:
        write_files(args.out, tokenizer.files())
    if tokenizer is None:
        tokenizer_note = "no tokenizer (the checkpoint holds none; pass --tokenizer)"
    elif tokenizer.kind == "bpe":
        tokenizer_note = "the BPE tokenizer (tokenizer.json, for AutoTokenizer)"
    else:
        tokenizer_note = (
            f"the {tokenizer.kind} tokenizer (tokenizer_info.json: fastgpt's; transformers has no {tokenizer.kind} "
            "tokenizer)"
        )
    print(
        f"wrote {args.out}: a transformers GPT-2 ({model.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
        f"{args.dtype}) and {tokenizer_note}"
    )
    return 0
