"""Training text: a file, a directory of text files, or, by default, the Python standard library's own
sources, which every Python installation has. Tokens are split once into a training part and a
held-out part, then served as (inputs, next-token targets) windows.
"""

import os
import sysconfig
from dataclasses import dataclass

import torch

from fastgpt.train.errors import UserError

VAL_FRACTION = 0.1  # the last 10% of the tokens are held out, as in nanoGPT
# The default corpus stops after this many bytes of source: enough text for a tiny model's first
# thousands of steps, and it reads and tokenizes in about a second.
STDLIB_MAX_BYTES = 4 * 2**20
# Left out of the default corpus: installed packages, and test suites (mostly repetitive fixtures).
STDLIB_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass
class Corpus:
    name: str  # what the text is, for messages and checkpoints
    documents: list  # of str, in a fixed order


def stdlib_corpus(max_bytes=STDLIB_MAX_BYTES):
    """The standard library's .py files, in sorted path order, until max_bytes of them are read."""
    root = sysconfig.get_paths()["stdlib"]
    documents, total = [], 0
    for path in _sorted_files(root, skip_dirs=STDLIB_SKIPPED_DIRS):
        if not path.endswith(".py"):
            continue
        text = _read_text(path)
        if text:
            documents.append(text)
            total += len(text)
        if total >= max_bytes:
            break
    if not documents:
        raise UserError(
            f"the default corpus is empty: no .py files under the standard library path {root}; pass --data"
        )
    return Corpus(
        f"Python {sysconfig.get_python_version()} standard library ({total / 2**20:.1f} MiB of .py)",
        documents,
    )


def read_corpus(path):
    """`--data`: None for the standard library, a text file, or a directory of text files (read
    recursively in sorted order; hidden files and files that are not UTF-8 text are skipped)."""
    if path is None:
        return stdlib_corpus()
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist")
    if os.path.isfile(path):
        text = _read_text(path)
        if text is None:
            raise UserError(f"--data {path} is not a UTF-8 text file")
        documents = [text] if text else []
    else:
        documents = [text for text in map(_read_text, _sorted_files(path)) if text]
    if not documents:
        raise UserError(f"--data {path} is empty: it holds no text")
    return Corpus(os.path.abspath(path), documents)


def _sorted_files(root, skip_dirs=()):
    """Every file under root that is not hidden, sorted by path."""
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in skip_dirs]
        paths.extend(os.path.join(directory, name) for name in files if not name.startswith("."))
    return sorted(paths)


def _read_text(path):
    """The file's text, or None if it is not UTF-8 text (binary files hold NUL bytes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            return None
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def split_tokens(tokens, seq_len, val_fraction=VAL_FRACTION):
    """(train, held-out) token tensors: the held-out part is the last val_fraction of the tokens."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    if len(train) <= seq_len or len(val) <= seq_len:
        needed = int((seq_len + 1) / val_fraction) + 1
        raise UserError(
            f"the data is too small: {len(tokens)} tokens, but --seq-len {seq_len} needs at least {needed} "
            f"(a {val_fraction:.0%} held-out split of more than {seq_len} tokens)"
        )
    return train, val


def windows(tokens, starts, seq_len):
    """(inputs, targets), each (N, seq_len) int64: tokens[s : s+seq_len] and the next token of each."""
    index = starts[:, None] + torch.arange(seq_len + 1)  # (N, seq_len + 1)
    chunk = tokens[index].long()
    return chunk[:, :-1], chunk[:, 1:]


class BatchSampler:
    """Random training windows. Every process draws the same global batch (one generator, one seed)
    and keeps its own slice, so a run's batches do not depend on how many processes share it."""

    def __init__(self, tokens, seq_len, seed):
        self.tokens, self.seq_len = tokens, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def global_batch(self, batch_size):
        """(inputs, targets), each (batch_size, seq_len), for one optimizer step of the whole run."""
        starts = torch.randint(len(self.tokens) - self.seq_len, (batch_size,), generator=self.generator)
        return windows(self.tokens, starts, self.seq_len)

    def state(self):
        return self.generator.get_state()

    def load_state(self, state):
        self.generator.set_state(state)


def eval_starts(tokens, seq_len, max_windows):
    """Start positions of up to max_windows non-overlapping held-out windows, spread evenly over the
    held-out tokens (back to back when max_windows covers them all). They are fixed, so every
    evaluation of a run scores the same tokens."""
    count = min(max_windows, (len(tokens) - 1) // seq_len)
    stride = (len(tokens) - 1 - seq_len) // max(count - 1, 1)  # >= seq_len, since count * seq_len <= len - 1
    return torch.arange(count) * stride
