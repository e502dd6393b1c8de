"""Tokenizers: a built-in byte-level one that needs no files, GPT-2-style BPE read from local files
with the `tokenizers` package, and nanoGPT's character-level vocabulary (its meta.pkl). Nothing is
downloaded.

A checkpoint directory records its tokenizer in tokenizer_info.json (plus tokenizer.json for BPE), so
`fastgpt generate` and `fastgpt eval` decode with exactly what training encoded with.
"""

import json
import os
import pickle

import torch

from fastgpt.train.errors import UserError

INFO_FILE = "tokenizer_info.json"
BPE_FILE = "tokenizer.json"  # the tokenizers package's single-file format, as in HF model directories
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # GPT-2's original BPE files
EOT_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token, which separates documents
# nanoGPT's character-level vocabulary, beside the train.bin and val.bin its data/shakespeare_char/prepare.py
# writes: a pickled {"vocab_size": n, "itos": {id: character}, "stoi": {character: id}}.
NANOGPT_META_FILE = "meta.pkl"


class InfoFileTokenizer:
    """A tokenizer recorded by its info() alone, in tokenizer_info.json."""

    def files(self):
        """{file name: contents} that record this tokenizer in a checkpoint directory."""
        return {INFO_FILE: json.dumps(self.info(), indent=2).encode()}


class ByteTokenizer(InfoFileTokenizer):
    """Token i < 256 is the byte i of the UTF-8 text; token 256 (with eot=True) ends a document."""

    kind = "byte"

    def __init__(self, eot=True):
        self.eot_id = 256 if eot else None
        self.vocab_size = 257 if eot else 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_documents(self, documents):
        """One flat int32 tensor of every document's tokens, each followed by eot (if any)."""
        encoded = [doc.encode("utf-8") for doc in documents]
        if self.eot_id is None:
            return torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8).to(torch.int32)
        tokens = torch.frombuffer(bytearray(b"\0".join(encoded) + b"\0"), dtype=torch.uint8).to(torch.int32)
        separators = (
            torch.tensor([len(doc) + 1 for doc in encoded]).cumsum(0) - 1
        )  # the positions of the b"\0"s
        tokens[separators] = self.eot_id
        return tokens

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def info(self):
        return {"type": self.kind, "eot": self.eot_id is not None}


class CharTokenizer(InfoFileTokenizer):
    """nanoGPT's character-level vocabulary: token i is the character chars[i] (65 of them for
    shakespeare_char). It has no end-of-text token, and a character outside it cannot be encoded."""

    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.ids = {char: i for i, char in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None

    @classmethod
    def from_meta(cls, path):
        """The vocabulary of nanoGPT's meta.pkl, unpickled as plain data only (PlainDataUnpickler)."""
        try:
            with open(path, "rb") as f:
                meta = PlainDataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
            raise UserError(f"cannot read nanoGPT's vocabulary {path} ({error})") from None
        itos = meta.get("itos") if isinstance(meta, dict) else None
        if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))) or not itos:
            raise UserError(
                f"{path} is not nanoGPT's meta.pkl: it needs 'itos', a dict of ids 0..n-1 to characters"
            )
        chars = [itos[i] for i in range(len(itos))]
        if not all(isinstance(char, str) and len(char) == 1 for char in chars):
            raise UserError(f"{path}: its 'itos' must map every id to one character")
        return cls(chars)

    def encode(self, text):
        try:
            return [self.ids[char] for char in text]
        except KeyError as error:
            raise UserError(
                f"the text holds {error.args[0]!r}, which this {self.vocab_size}-character vocabulary lacks"
            ) from None

    def encode_documents(self, documents):
        """One flat int32 tensor of every document's characters' ids (no separator: there is no eot)."""
        return torch.tensor([i for document in documents for i in self.encode(document)], dtype=torch.int32)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < self.vocab_size)

    def info(self):
        return {"type": self.kind, "chars": self.chars}


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers), which is all nanoGPT's meta.pkl holds:
    a file that names any class or function is refused instead of having it called."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data is read")


class BPETokenizer(InfoFileTokenizer):
    """Byte-level BPE through the `tokenizers` package (GPT-2's tokenizer when given its files)."""

    kind = "bpe"

    def __init__(self, backend):
        self.backend = backend
        self.eot_id = backend.token_to_id(EOT_TEXT)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """GPT-2's layout: vocab.json + merges.txt, byte-level pre-tokenization and decoding."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        backend = Tokenizer(models.BPE.from_file(vocab_path, merges_path))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id(EOT_TEXT) is not None:
            backend.add_special_tokens([EOT_TEXT])  # kept whole when it appears in text
        return cls(backend)

    @classmethod
    def from_file(cls, path):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path))

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_documents(self, documents):
        """One flat int32 tensor of every document's tokens, each followed by eot (if any)."""
        separator = [] if self.eot_id is None else [self.eot_id]
        ids = []
        for encoding in self.backend.encode_batch(documents, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.extend(separator)
        return torch.tensor(ids, dtype=torch.int32)

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def info(self):
        return {"type": self.kind}

    def files(self):
        """tokenizer.json beside the info file."""
        return {BPE_FILE: self.backend.to_str().encode(), **super().files()}


class StreamDecoder:
    """Turns tokens, as they are generated, into text that can be printed at once.

    A token can end in the middle of a UTF-8 character (always possible with bytes, and with byte-level
    BPE); such a tail decodes to U+FFFD and is held back until the next tokens complete it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        new, self.emitted = text[self.emitted : end], max(self.emitted, end)
        return new

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted :], len(text)
        return new


def from_directory(directory):
    """The tokenizer stored in a checkpoint or HF model directory, or None if it holds none."""
    info_path = os.path.join(directory, INFO_FILE)
    if os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{info_path} is not valid JSON ({error})") from None
        if info.get("type") == "byte":
            return ByteTokenizer(eot=bool(info.get("eot", True)))
        if info.get("type") == "char" and isinstance(info.get("chars"), list):
            return CharTokenizer(info["chars"])
        if info.get("type") != "bpe":
            raise UserError(
                f"{info_path}: unknown tokenizer type {info.get('type')!r} (expected 'byte', 'bpe' or 'char')"
            )
        return _read_bpe_file(os.path.join(directory, BPE_FILE))
    if os.path.isfile(os.path.join(directory, BPE_FILE)):
        return _read_bpe_file(os.path.join(directory, BPE_FILE))
    vocab, merges = os.path.join(directory, VOCAB_FILE), os.path.join(directory, MERGES_FILE)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        try:
            return BPETokenizer.from_files(vocab, merges)
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
            raise UserError(f"cannot read BPE files {vocab} and {merges} ({error})") from None
    meta = os.path.join(directory, NANOGPT_META_FILE)
    if os.path.isfile(meta):
        return CharTokenizer.from_meta(meta)
    return None


def _read_bpe_file(path):
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        return BPETokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
        raise UserError(f"cannot read tokenizer file {path} ({error})") from None


def load_tokenizer(spec):
    """`--tokenizer`: 'byte', a tokenizer.json file, nanoGPT's meta.pkl, or a directory holding
    tokenizer.json, vocab.json + merges.txt (for example a local HF GPT-2 directory) or meta.pkl (nanoGPT's
    data/shakespeare_char)."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isfile(spec):
        return CharTokenizer.from_meta(spec) if spec.endswith(".pkl") else _read_bpe_file(spec)
    if not os.path.isdir(spec):
        raise UserError(f"--tokenizer {spec!r} is neither 'byte' nor an existing file or directory")
    tokenizer = from_directory(spec)
    if tokenizer is None:
        raise UserError(
            f"--tokenizer directory {spec} holds no {BPE_FILE}, {INFO_FILE}, {VOCAB_FILE} + {MERGES_FILE}, or "
            f"{NANOGPT_META_FILE}"
        )
    return tokenizer
