"""Data at scale, measured: python scripts/ingest_bench.py [--gb 1.0] [--dir /tmp/escarda_big]

1. Generates a corpus of --gb GB (the packaged texts' paragraphs shuffled and repeated, in 32 MB
   text files; never committed) unless it is already there.
2. Trains the BPE tokenizer once (on data.tokenizer.sample_bytes of it), then, side by side on the
   same documents: the bare `tokenizers` batch encode, and our streaming build (encode + split +
   shards + index), each in a child process whose peak RSS is read from the kernel.
3. Kills a build halfway (SIGKILL once progress.json shows finished shards) and reruns it: the
   finished shards are kept and the build completes.
4. Times a second `prepare` (the cache found by file fingerprints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 4096
CHILD = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from escarda_lab import corpora, data
from escarda_lab.config import DataConfig, TokenizerConfig
mode, corpus, cache, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = DataConfig(corpus=corpus, tokenizer=TokenizerConfig(kind="bpe", vocab_size=vocab), cache_dir=cache)
t0 = time.perf_counter()
if mode == "bare":
    from tokenizers import Tokenizer
    from escarda_lab import shards
    tok = Tokenizer.from_file(sys.argv[5])
    n_bytes = n_tokens = 0
    for batch in shards.batches(data.corpus_documents(cfg, "bench"), shards.ENCODE_BYTES):
        n_bytes += sum(len(d.encode()) for d in batch)
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
    out = {"bytes": n_bytes, "tokens": n_tokens}
else:
    td = data.prepare(cfg, "bench")
    out = {"bytes": td.meta["train"]["bytes"] + td.meta["val"]["bytes"],
           "tokens": td.meta["train"]["tokens"] + td.meta["val"]["tokens"],
           "shards": len(td.meta["train"]["shards"])}
out["seconds"] = time.perf_counter() - t0
import resource
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
print("RESULT " + json.dumps(out), flush=True)
"""


def make_corpus(folder: Path, gb: float) -> None:
    from escarda_lab import corpora

    if folder.exists() and sum(p.stat().st_size for p in folder.glob("*.txt")) >= gb * 1e9:
        return
    folder.mkdir(parents=True, exist_ok=True)
    paras = [p for _, t in corpora.corpus_files("classics") for p in t.split("\n\n") if p.strip()]
    rng = random.Random(0)
    written, k = 0, 0
    while written < gb * 1e9:
        rng.shuffle(paras)
        text = "\n\n".join(paras)[: 32 << 20]
        (folder / f"part-{k:04d}.txt").write_text(text)
        written += len(text.encode())
        k += 1


def child(mode: str, corpus: Path, cache: Path, *extra: str) -> dict:
    """Runs one measurement in a fresh process: its result, with its own peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(corpus), str(cache), str(VOCAB), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def peak_rss(pid: int) -> int:
    """A live process's peak RSS in bytes (VmHWM), 0 once it is gone."""
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/escarda_big")
    args = ap.parse_args()
    root = Path(args.dir)
    corpus, cache = root / "corpus", root / "cache"
    t0 = time.perf_counter()
    make_corpus(corpus, args.gb)
    size = sum(p.stat().st_size for p in corpus.glob("*.txt"))
    print(f"corpus: {size / 1e9:.2f} GB in {len(list(corpus.glob('*.txt')))} files ({time.perf_counter() - t0:.0f} s)")
    subprocess.run(["rm", "-rf", str(cache)], check=True)

    # A build killed once two shards are finished (the tokenizer is trained first), then rerun.
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "build", str(corpus), str(cache), str(VOCAB)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t_start, shards_done, hwm = time.perf_counter(), 0, 0
    while proc.poll() is None:
        hwm = max(hwm, peak_rss(proc.pid))
        found = list(cache.glob("*/progress.json"))
        if found and (shards_done := json.loads(found[0].read_text()).get("shards", 0)) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    print(
        f"killed the first build after {time.perf_counter() - t_start:.0f} s, {shards_done} finished shard(s); "
        f"its peak RSS (tokenizer training included) {hwm / 1e9:.2f} GB"
    )
    folder = next(p for p in cache.iterdir() if p.is_dir() and p.name != "fingerprints")
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("train-*.bin")}
    resumed = child("build", corpus, cache)
    untouched = all((folder / n).stat().st_mtime_ns == t for n, t in kept.items())
    print(f"rerun: finished in {resumed['seconds']:.0f} s; {len(kept)} finished train shards untouched: {untouched}")

    # Side by side on the same documents with the same tokenizer: our build (encode, split,
    # shards, index) and the bare `tokenizers` batch encode.
    for p in folder.iterdir():
        if p.name != "tokenizer.json":
            p.unlink()
    built = child("build", corpus, cache)
    bare = child("bare", corpus, cache, str(folder / "tokenizer.json"))
    t = time.perf_counter()
    second = child("build", corpus, cache)
    second["process_s"] = time.perf_counter() - t  # interpreter, imports and prepare
    print(json.dumps({"build": built, "bare": bare, "second": second}))
    mbps = lambda r: r["bytes"] / r["seconds"] / 1e6  # noqa: E731
    print(
        f"build: {mbps(built):.1f} MB/s ({built['seconds']:.0f} s, {built['tokens'] / 1e6:.0f} M tokens, "
        f"{built['shards']} train shards), peak RSS {built['peak_rss_gb']:.2f} GB"
    )
    print(f"bare encode_batch: {mbps(bare):.1f} MB/s ({bare['seconds']:.0f} s), peak RSS {bare['peak_rss_gb']:.2f} GB")
    print(f"build throughput / bare: {bare['seconds'] / built['seconds']:.2f}")
    print(f"second run: prepare {second['seconds']:.2f} s, whole process {second['process_s']:.1f} s (cache found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
