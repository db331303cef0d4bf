"""The token cache and the LightningDataModules (corpora are in `corpora`, tokenizers in
`tokenizer`).

The train/val split is by document (content hash, deterministic).
Each (corpus, tokenizer) is tokenized once into `uint16`/`uint32` memmaps under the cache folder,
shared by every run of a grid. Training batches are random windows: batch k is drawn from a
generator seeded by (seed, k), so the data position is just the step count and resumes exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler

from escarda_lab import config, corpora, probe_sets, probes, shards
from escarda_lab.errors import DataError
from escarda_lab.io import read_json
from escarda_lab.tokenizer import BOS, BPETokenizer, ByteTokenizer, ProbeTokenizer, Tokenizer, load_tokenizer

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


def prepare(data_cfg, source: str = "data", seed: int = 0, tokenizer: Tokenizer | None = None):
    """Load or build (once, under a lock) the tokenizer and token shards for this data config;
    for a probe task, its train and test sets generated from `seed` (the data seed). `tokenizer`:
    a finished run's own (its folder keeps it): a missing cache is rebuilt with it, never a newly
    trained one, so an evaluation reads exactly the tokens the run trained on."""
    if probes.task_of(data_cfg.corpus) is not None:
        return prepare_probe(data_cfg, source, seed)
    root = cache_root(data_cfg)
    key, total = corpora.corpus_key(data_cfg.corpus, source, data_cfg.text_field, root)
    tk = data_cfg.tokenizer
    tok_id = "byte" if tk.kind == "byte" else f"bpe{tk.vocab_size}-s{tk.sample_bytes}"
    folder = root / f"{key}-v{data_cfg.val_fraction}-{tok_id}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f"{folder.name}.lock"):  # parallel runs build each cache once
        log = logging.getLogger("escarda_lab")
        if (folder / "meta.json").exists():
            found = read_json(folder / "meta.json")  # None (with a warning) when damaged
            why = shards.damage(folder, found) if found is not None else "its meta.json is damaged"
            if why:
                log.warning("the token cache in %s is damaged (%s): rebuilding it with its own tokenizer", folder, why)
                shards.discard(folder)
        if not (folder / "meta.json").exists():
            log.info(
                "building the token cache of %s (%s) in %s: once per corpus and tokenizer",
                data_cfg.corpus,
                tok_id,
                folder,
            )
            t0 = time.perf_counter()
            try:
                _build(data_cfg, folder, source, total, tokenizer)
            except OSError as e:
                from escarda_lab.run_folder import storage_error

                err = storage_error(
                    e,
                    folder,
                    "the token cache",
                    "data.cache_dir",
                    "free space (or point data.cache_dir / ESCARDA_CACHE at a larger disk) and rerun: the build "
                    "resumes after its last finished shard",
                )
                if err is None:
                    raise
                raise err from None
            log.info("token cache built in %.0f s", time.perf_counter() - t0)
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_tokenizer(folder, tk.kind)
    split = shards.streams(folder, meta)
    return TokenData(tok, split["train"], split["val"], meta)


def corpus_documents(data_cfg, source: str) -> Iterator[str]:
    return corpora.iter_documents(corpora.iter_texts(data_cfg.corpus, source, data_cfg.text_field))


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


def _build(data_cfg, folder: Path, source: str, total_bytes: int | None, given: Tokenizer | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if given is not None:
        tok = given
        tok.save(folder)
    elif data_cfg.tokenizer.kind == "byte":
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
    probe: probe_sets.ProbeSet
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
        ps = probe_sets.build(task, data_cfg.probe, data_cfg.seq_len, seed)
    except probes.ProbeError as e:
        raise probe_error(e, source, task) from None
    tok = ProbeTokenizer(probes.vocab_size(task, data_cfg.probe))
    scored = int((ps.test_labels != probes.IGNORE).sum())
    meta = {"task": task, "params": ps.params, "vocab_size": tok.vocab_size, "test_scored": scored}
    return ProbeTokens(tok, ps, meta)


class ProbeBatches(Dataset):
    """Index k -> this rank's share of training batch k of a probe task (a function of (seed, k))."""

    def __init__(self, probe: probe_sets.ProbeSet, batch_size: int, seed: int, rank: int, world: int):
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
        cap = cfg.train.final_val_tokens // cfg.data.seq_len
        self.all_rows = np.arange(min(len(p.test_inputs), cap) if cap > 0 else len(p.test_inputs))

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
        cap = cfg.train.final_val_tokens // d.seq_len
        if 0 < cap < len(starts):  # evenly spread windows, the same for every run of this split
            starts = starts[np.linspace(0, len(starts) - 1, max(cap, 1)).round().astype(int)]
        self.all_val_starts = starts
        # Periodic validation: the same evenly spread windows every time, so curves compare.
        self.val_starts = starts[np.linspace(0, len(starts) - 1, n).round().astype(int)]

    def train_batches(self, rank: int, world: int) -> Dataset:
        d = self.cfg.data
        return TrainWindows(self.tokens.train, d.seq_len, d.batch_size, config.seeds(self.cfg)[1], rank, world)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_starts)

    def final_loader(self) -> DataLoader:
        """The whole validation split (or train.final_val_tokens of it), unsharded: what a run ends with."""
        return self.loader(self.all_val_starts, shard=False)

    def loader(self, starts: np.ndarray, shard: bool = True) -> DataLoader:
        """Validation windows at `starts`; split across processes unless shard=False."""
        rank, world = self._rank_world() if shard else (0, 1)
        ds = Windows(self.tokens.val, starts[rank::world], self.cfg.data.seq_len)
        return DataLoader(ds, batch_size=self.cfg.data.batch_size, collate_fn=collate)
