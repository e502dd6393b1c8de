"""Files as other tools write them, for the tests that read them: nanoGPT's and llm.c's token files,
nanoGPT's character vocabulary (meta.pkl), and a small byte-level BPE trained with `tokenizers`."""

import pickle

import torch

from fastgpt.train.data import LLMC_MAGIC


def write_token_file(path, ids, llmc_header=False):
    """ids as nanoGPT's prepare.py writes them (uint16, back to back), or llm.c's (a 256 x int32 header:
    magic, version, count)."""
    with open(path, "wb") as f:
        if llmc_header:
            header = torch.zeros(256, dtype=torch.int32)
            header[:3] = torch.tensor([LLMC_MAGIC, 1, len(ids)])
            f.write(header.numpy().tobytes())
        f.write(torch.tensor(ids, dtype=torch.int32).to(torch.uint16).numpy().tobytes())


def write_nanogpt_meta(path, text):
    """meta.pkl as nanoGPT's data/shakespeare_char/prepare.py writes it; returns its characters in id order."""
    chars = sorted(set(text))
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    return chars


def byte_level_bpe(texts, vocab_size):
    """A `tokenizers` BPE of vocab_size tokens trained on texts, with GPT-2's byte-level pre-tokenizer and
    decoder and its end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return backend
