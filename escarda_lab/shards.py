"""The token cache at any corpus size: streamed, sharded, resumable.

    documents (streamed) -> split by content hash -> batched encode (the fast tokenizer, all
    cores) -> token shards <split>-<k>.bin (uint16 when the vocabulary fits, else uint32) with a
    document index <split>-<k>.idx (each document's first token) -> meta.json when complete

The corpus is never held in memory: at most one shard of tokens (SHARD_TOKENS) and one encode
batch (ENCODE_BYTES of text). Shards are written atomically, train and val shard k together, and
progress.json records how many documents they hold: an interrupted build resumes after the last
finished shard. `TokenStream` reads a split's shards as one array of tokens through memmaps.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from escarda_lab.errors import DataError
from escarda_lab.io import atomic_path, read_json, write_json

SHARD_TOKENS = 1 << 24  # train tokens per shard (32 MiB as uint16)
ENCODE_BYTES = 4 << 20  # text per encode_batch call
SPLITS = ("train", "val")
log = logging.getLogger("escarda_lab")


def doc_key(doc: str) -> float:
    """A document's place in [0, 1) by content hash: below val_fraction it is a val document."""
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") / 2**64


class TokenStream:
    """A split's shards as one read-only token array: len(), and indexing by ints or int arrays
    (a window may cross from one shard into the next)."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.maps = [np.memmap(p, dtype=dtype, mode="r") for p in paths]
        sizes = np.array([len(m) for m in self.maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.maps) == 1:
            return self.maps[0][idx]
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range for a stream of {len(self)}")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.maps[s][idx[at] - self.starts[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


class Progress:
    """A log line every few seconds: bytes/s, tokens/s and the ETA (when the size is known)."""

    def __init__(self, total_bytes: int | None, every: float = 5.0):
        self.total, self.every = total_bytes, every
        self.t0 = self.last = time.perf_counter()
        self.bytes = self.tokens = 0

    def update(self, n_bytes: int, n_tokens: int, force: bool = False) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = self.bytes / dt
        line = f"tokenized {self.bytes / 1e6:,.0f} MB"
        if self.total:
            eta = max(self.total - self.bytes, 0) / max(rate, 1)
            line += f" of {self.total / 1e6:,.0f} MB ({100 * self.bytes / self.total:.0f}%)"
        line += f" · {rate / 1e6:.1f} MB/s · {self.tokens / dt / 1e6:.2f} M tokens/s"
        line += f" · ETA {eta:.0f} s" if self.total else ""
        log.info(line)


def batches(docs: Iterable[str], n_bytes: int) -> Iterator[list[str]]:
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= n_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


class ShardWriter:
    """Token buffers of both splits; `flush()` writes shard k of each and records the progress."""

    def __init__(self, folder: Path, dtype, bos: int, state: dict):
        self.folder, self.dtype, self.bos, self.state = folder, np.dtype(dtype), bos, state
        self.buf: dict[str, list[tuple[float, np.ndarray, int]]] = {s: [] for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}

    def add(self, split: str, key: float, ids: list[int], n_bytes: int) -> int:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[0] = self.bos
        arr[1:] = ids
        self.buf[split].append((key, arr, n_bytes))
        self.tokens[split] += arr.size
        return arr.size

    def flush(self, docs_done: int) -> None:
        k = self.state["shards"]
        for split in SPLITS:
            docs = self.buf[split]
            if not docs:
                continue
            stream = np.concatenate([a for _, a, _ in docs])
            index = np.cumsum([0] + [a.size for _, a, _ in docs[:-1]], dtype=np.int64)
            name = f"{split}-{k:05d}"
            with atomic_path(self.folder / f"{name}.bin") as tmp:
                stream.tofile(tmp)
            with atomic_path(self.folder / f"{name}.idx") as tmp:
                index.tofile(tmp)
            s = self.state[split]
            digest = hashlib.blake2b(stream.tobytes(), digest_size=16).hexdigest()
            s["shards"].append({"file": f"{name}.bin", "tokens": int(stream.size), "blake2b": digest})
            s["documents"] += len(docs)
            s["tokens"] += int(stream.size)
            s["bytes"] += sum(b for _, _, b in docs)
            self.buf[split], self.tokens[split] = [], 0
        self.state["shards"] = k + 1
        self.state["docs_done"] = docs_done
        write_json(self.folder / "progress.json", self.state)

    def balance(self, source: str) -> None:
        """Before the last flush: each split needs a document (a tiny corpus may put all in one).
        The one moved is the lowest-keyed train / highest-keyed val document of those not yet
        written (of all of them, when the corpus fits one shard: the in-memory split's rule)."""
        for src, dst, pick in (("train", "val", min), ("val", "train", max)):
            if self.state[dst]["documents"] == 0 and not self.buf[dst]:
                if len(self.buf[src]) < 2:
                    n = self.state[src]["documents"] + len(self.buf[src])
                    raise DataError(
                        source,
                        "data.corpus",
                        f"the corpus has {n} document(s) and none for the {dst} split",
                        "use more text, or a larger data.val_fraction",
                    )
                i = self.buf[src].index(pick(self.buf[src], key=lambda d: d[0]))
                self.buf[dst].append(self.buf[src].pop(i))


def build(
    docs: Iterable[str],
    tok,
    bos: int,
    folder: Path,
    val_fraction: float,
    source: str,
    total_bytes: int | None,
    extra: dict,
) -> dict:
    """Tokenize the document stream into shards in `folder`, each document after a `bos` token
    (resuming a build that stopped); returns meta (written last, as meta.json: the cache is
    complete when it exists)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    blank = {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    state = read_json(folder / "progress.json") or {"docs_done": 0, "shards": 0, **{s: dict(blank) for s in SPLITS}}
    for s in SPLITS:
        state[s] = {**blank, **state[s], "shards": list(state[s]["shards"])}
    skip = state["docs_done"]
    if skip:
        log.info("resuming the token cache build after %d finished shard(s) (%d documents)", state["shards"], skip)
    writer = ShardWriter(folder, dtype, bos, state)
    progress = Progress(total_bytes)
    done = 0
    for batch in batches(docs, ENCODE_BYTES):
        if done + len(batch) <= skip:  # in finished shards: read past, not encoded
            done += len(batch)
            progress.update(sum(len(d.encode("utf-8")) for d in batch), 0)
            continue
        batch = batch[max(skip - done, 0) :]
        n_tokens = 0
        sizes = [len(d.encode("utf-8")) for d in batch]
        for d, ids, n in zip(batch, tok.encode_batch(batch), sizes):
            key = doc_key(d)
            n_tokens += writer.add("val" if key < val_fraction else "train", key, ids, n)
        done = max(done, skip) + len(batch)
        progress.update(sum(sizes), n_tokens)
        if writer.tokens["train"] >= SHARD_TOKENS:
            writer.flush(done)
    writer.balance(source)
    writer.flush(done)
    progress.update(0, 0, force=True)
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "format": "shards", **extra}
    meta.update({s: state[s] for s in SPLITS})
    write_json(folder / "meta.json", meta)
    (folder / "progress.json").unlink(missing_ok=True)
    return meta


def damage(folder: Path, meta: dict) -> str:
    """What is wrong with a finished cache's shards ("" when nothing): a missing shard, one whose
    size or checksum differs from what meta.json recorded, or (in caches written before checksums)
    a token id outside the vocabulary. Hashing costs about a second per GB."""
    if meta.get("format") != "shards":
        return ""
    dtype = np.dtype(meta["dtype"])
    for split in SPLITS:
        for sh in meta[split]["shards"]:
            path = folder / sh["file"]
            if not path.exists():
                return f"{path} is missing"
            if path.stat().st_size != sh["tokens"] * dtype.itemsize:
                return f"{path} holds {path.stat().st_size:,} bytes, not the {sh['tokens'] * dtype.itemsize:,} recorded"
            if "blake2b" in sh:
                with open(path, "rb") as f:
                    if hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest() != sh["blake2b"]:
                        return f"{path} does not match its checksum"
            elif len(tokens := np.memmap(path, dtype=dtype, mode="r")) and int(tokens.max()) >= meta["vocab_size"]:
                return f"{path} holds token ids outside the vocabulary of {meta['vocab_size']}"
    return ""


def discard(folder: Path) -> None:
    """Remove a damaged cache's shards and meta.json; the tokenizer stays, so a rebuild gives the
    same tokens."""
    (folder / "meta.json").unlink(missing_ok=True)
    (folder / "progress.json").unlink(missing_ok=True)
    for split in SPLITS:
        for path in [*folder.glob(f"{split}-*.bin"), *folder.glob(f"{split}-*.idx"), folder / f"{split}.bin"]:
            path.unlink(missing_ok=True)


def streams(folder: Path, meta: dict) -> dict[str, TokenStream | np.ndarray]:
    """Each split's tokens (a one-file cache of an earlier version is read as it is)."""
    dtype = np.dtype(meta["dtype"])
    if meta.get("format") != "shards":
        return {s: np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}
    return {s: TokenStream([folder / sh["file"] for sh in meta[s]["shards"]], dtype) for s in SPLITS}


def documents_index(folder: Path, meta: dict, split: str) -> np.ndarray:
    """Where each document of a split starts, in the split's token stream."""
    out, offset = [], 0
    for sh in meta[split]["shards"]:
        out.append(np.fromfile(folder / sh["file"].replace(".bin", ".idx"), dtype=np.int64) + offset)
        offset += sh["tokens"]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
