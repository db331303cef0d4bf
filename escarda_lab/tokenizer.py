"""Tokenizers: byte-level BPE (trained on a corpus, cached), raw bytes, and a probe task's own.
Every one reserves ids 0..7 for the specials and knows each token's UTF-8 byte length (for bpb)."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from escarda_lab import probes
from escarda_lab.io import atomic_write
from escarda_lab.layers import PAD

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


UNK, BOS, EOS, IM_START, IM_END = range(PAD + 1, PAD + 6)


class Tokenizer(abc.ABC):
    """Common interface: encode/decode, special ids, and each token's UTF-8 byte length."""

    kind: str
    vocab_size: int
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """[vocab] number of UTF-8 bytes each token stands for (0 for specials)."""

    def special_id(self, token: str) -> int:
        return SPECIALS.index(token)

    def save(self, folder: Path) -> None:  # noqa: B027 (optional: most tokenizers have nothing to write)
        """Write what `load_tokenizer(folder, kind)` needs (nothing for the byte tokenizer)."""


def load_tokenizer(folder: Path, kind: str) -> Tokenizer:
    return ByteTokenizer() if kind == "byte" else BPETokenizer.load(Path(folder) / "tokenizer.json")


def run_tokenizer(folder: Path, data_cfg) -> Tokenizer:
    """The tokenizer a run trained with: a probe task's own, else the one saved in its folder."""
    task = probes.task_of(data_cfg.corpus)
    if task is not None:
        return ProbeTokenizer(probes.vocab_size(task, data_cfg.probe))
    return load_tokenizer(folder, data_cfg.tokenizer.kind)


class ProbeTokenizer(Tokenizer):
    """A probe task's tokens: ids 0..7 are the specials, 8 + t is task token t, written "t"."""

    kind = "probe"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_batch(self, texts):
        return [[int(t) + len(SPECIALS) for t in text.split()] for text in texts]

    def decode(self, ids) -> str:
        return " ".join(str(i - len(SPECIALS)) if i >= len(SPECIALS) else SPECIALS[i] for i in ids)

    def token_bytes(self):  # one "byte" per task token: bpb is then the loss in bits per token
        return np.array([0] * len(SPECIALS) + [1] * (self.vocab_size - len(SPECIALS)), dtype=np.int64)


class ByteTokenizer(Tokenizer):
    """Ids 0..7 are the specials, 8 + b is byte b."""

    kind = "byte"
    vocab_size = len(SPECIALS) + 256

    def encode_batch(self, texts):
        return [(np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) + len(SPECIALS)).tolist() for t in texts]

    def decode(self, ids) -> str:
        return bytes(i - len(SPECIALS) for i in ids if i >= len(SPECIALS)).decode("utf-8", errors="replace")

    def token_bytes(self):
        return np.array([0] * len(SPECIALS) + [1] * 256, dtype=np.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (HF `tokenizers`); the specials are atomic tokens with ids 0..7."""

    kind = "bpe"

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()

    @classmethod
    def train(cls, docs: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HF
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(docs, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HF

        return cls(HF.from_file(str(path)))

    def save(self, folder: Path) -> None:
        atomic_write(Path(folder) / "tokenizer.json", self.hf.to_str())

    def encode_batch(self, texts):
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self):
        # Byte-level BPE writes every byte as one printable character, so a token's byte count
        # is the length of its string form.
        return np.array(
            [0 if i < len(SPECIALS) else len(self.hf.id_to_token(i)) for i in range(self.vocab_size)], dtype=np.int64
        )
