"""Tokenizers for ``sharded-ams prepare-data``: byte-level, a BPE trained on the corpus, or
an existing ``tokenizer.json``, all saved as a Hugging Face ``tokenizers`` file.

* ``byte`` (default; nothing to train): token = byte value, vocabulary 256. Encoded with
  numpy straight from the file's bytes (no decoding, so any bytes are fine). Its
  ``tokenizer.json`` is an equivalent Hugging Face tokenizer (a byte-level BPE with the
  256 byte symbols numbered by value and no merges), so an exported model loads with
  ``AutoTokenizer`` whatever the tokenizer.
* ``bpe:VOCAB``: a byte-level BPE (GPT-2's pre-tokenizer) trained on the corpus with
  Hugging Face ``tokenizers``; ``<|endoftext|>`` (id 0) ends every document.
* ``PATH/tokenizer.json``: any Hugging Face tokenizer file; its end-of-text token, if it
  has a usual one, ends every document.

Special tokens written literally in a document (the text ``<|endoftext|>``) are encoded as
the text they are, never as the special token's id: the end-of-text id is appended by id,
so untrusted text cannot insert false document boundaries (``encode_special_tokens``).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

__all__ = ["Tokenizer", "parse_tokenizer_spec", "byte_tokenizer", "train_bpe", "load_tokenizer_file",
           "tokenizer_json_vocab", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


def parse_tokenizer_spec(spec: str) -> tuple[str, Optional[int], Optional[str]]:
    """``"byte"`` -> ("byte", 256, None); ``"bpe:8192"`` -> ("bpe", 8192, None); a path to a
    tokenizer.json (or a directory holding one) -> ("file", None, path). ValueError otherwise."""
    if spec == "byte":
        return "byte", 256, None
    if spec.startswith("bpe:"):
        raw = spec[4:]
        if not raw.isdigit() or not 257 <= int(raw) <= 2**32:
            raise ValueError(f"--tokenizer {spec!r}: the BPE vocabulary must be an integer "
                             "in [257, 2**32], e.g. bpe:8192")
        return "bpe", int(raw), None
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"--tokenizer {spec!r}: not 'byte', 'bpe:VOCAB' or an existing "
                         f"tokenizer.json ({path} not found)")
    return "file", None, str(path.absolute())


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level pre-tokenizer uses for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


class Tokenizer:
    """Text -> token ids with one interface over the three kinds (see the module docstring).

    ``hf`` is the Hugging Face ``tokenizers.Tokenizer``; ``eos_id`` the id appended after
    every document (None for the byte tokenizer: its 256 ids are all bytes).
    """

    def __init__(self, kind: str, hf, eos_id: Optional[int]):
        self.kind, self.hf, self.eos_id = kind, hf, eos_id
        if kind != "byte":
            _literal_special_tokens(hf)
        # the largest id + 1, not the entry count: a tokenizer.json whose ids have gaps (an
        # added token at 70000 among 257 entries) needs the room (and a dtype that holds it)
        self.vocab_size: int = 256 if kind == "byte" else _id_bound(hf)

    def encode_bytes(self, chunks: list[bytes]) -> list[np.ndarray]:
        """Token ids (int64) of each chunk of UTF-8 text. Chunks must end on a character
        boundary (prepare-data cuts them after a newline)."""
        if self.kind == "byte":
            return [np.frombuffer(c, dtype=np.uint8).astype(np.int64) for c in chunks]
        texts = [c.decode("utf-8", errors="replace") for c in chunks]
        # encode_batch_fast: no offsets (less memory and time); threads over the chunks
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encs = encode(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes([text.encode("utf-8")])[0].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids)

    def save(self, path: os.PathLike) -> str:
        """Write ``tokenizer.json`` to ``path``; returns its sha256."""
        self.hf.save(str(path))
        return _sha256(path)

    def describe(self) -> dict:
        """The ``tokenizer`` entry of a prepare-data index."""
        eos = None if self.eos_id is None else self.hf.id_to_token(self.eos_id)
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": eos, "file": "tokenizer.json"}


def _literal_special_tokens(hf) -> None:
    """Make ``hf`` encode special tokens written in the text (``<|endoftext|>`` inside a
    document) as ordinary text: the corpus is untrusted, and a literal match would put a
    false document boundary (the end-of-text id) inside a document. The end-of-text id
    prepare-data appends after each document is added by id, not by text. The flag is not
    saved in tokenizer.json (an exported tokenizer behaves as usual)."""
    if not hasattr(hf, "encode_special_tokens"):
        import tokenizers

        raise ValueError(f"tokenizers {tokenizers.__version__} cannot encode special tokens "
                         "written in the text as text (encode_special_tokens); install "
                         "tokenizers>=0.19 (pip install -U tokenizers)")
    hf.encode_special_tokens = True


def _id_bound(hf) -> int:
    """1 + the largest id of a Hugging Face tokenizer (its vocabulary and added tokens)."""
    ids = hf.get_vocab(with_added_tokens=True).values()
    return max(max(ids, default=-1) + 1, hf.get_vocab_size(with_added_tokens=True))


def _sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _byte_level_parts():
    from tokenizers import decoders, pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()


def byte_tokenizer() -> Tokenizer:
    """Token = byte value; the Hugging Face equivalent is built for saving and decoding."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.BPE(vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[]))
    hf.pre_tokenizer, hf.decoder = _byte_level_parts()
    hf.pre_tokenizer.use_regex = False  # one run of bytes: no merges anyway, ids = bytes
    return Tokenizer("byte", hf, None)


def train_bpe(texts: Iterator[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` = id 0) trained on ``texts``
    (streamed: the trainer keeps word counts, not the text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = _byte_level_parts()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer("bpe", hf, hf.token_to_id(EOS_TOKEN))


def load_tokenizer_file(path: os.PathLike) -> Tokenizer:
    """A Hugging Face ``tokenizer.json``; ValueError naming the file if it does not parse."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from None
    eos = next((hf.token_to_id(t) for t in _EOS_CANDIDATES if hf.token_to_id(t) is not None), None)
    return Tokenizer("file", hf, eos)


def tokenizer_json_vocab(text: str) -> int:
    """The vocabulary size prepare-data writes into an index for the tokenizer.json ``text``
    (1 + its largest id, :class:`Tokenizer`); ValueError if it does not parse."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_str(text)
    except Exception as exc:  # untrusted bytes: any parse failure is a refusal, no traceback
        raise ValueError(f"not a Hugging Face tokenizer.json ({type(exc).__name__})") from None
    return _id_bound(hf)


def tokenizer_config(tok_entry: dict) -> dict:
    """``tokenizer_config.json`` so ``transformers.AutoTokenizer.from_pretrained`` reads the
    saved ``tokenizer.json`` (written by ``ckpt export``)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": 1_000_000_000}
    if tok_entry.get("eos_token"):
        cfg.update(eos_token=tok_entry["eos_token"], bos_token=tok_entry["eos_token"])
    return cfg

