"""The token cache at scale: shards, reading across them, the document index, resuming an
interrupted build, the tokenizer's training sample, the second run's start."""

from __future__ import annotations

import numpy as np
import pytest

from escarda_lab import corpora, data, shards, tokenizer
from escarda_lab.config import DataConfig, TokenizerConfig


def data_cfg(corpus, tmp_path, kind="byte", **tok) -> DataConfig:
    """val_fraction 0.3: the ~17-document corpus has val documents in more than one shard."""
    return DataConfig(
        corpus=str(corpus),
        tokenizer=TokenizerConfig(kind=kind, **tok),
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.3,
    )


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_TOKENS", 20_000)
    monkeypatch.setattr(shards, "ENCODE_BYTES", 5_000)


def test_a_sharded_build_is_the_one_file_stream(corpus, tmp_path, small_shards):
    one = data.prepare(data_cfg(corpus, tmp_path / "a"))
    shards.SHARD_TOKENS = 10**9
    whole = data.prepare(data_cfg(corpus, tmp_path / "b"))
    assert len(one.meta["train"]["shards"]) > 3 and len(whole.meta["train"]["shards"]) == 1
    assert np.array_equal(one.train[:], whole.train[:]) and np.array_equal(one.val[:], whole.val[:])


def test_windows_read_across_shard_boundaries(corpus, tmp_path, small_shards):
    td = data.prepare(data_cfg(corpus, tmp_path))
    flat = np.asarray(td.train)
    edge = int(td.train.starts[1])
    idx = np.array([[edge - 3 + i for i in range(6)], [0, 1, 2, 3, 4, 5]])
    assert np.array_equal(td.train[idx], flat[idx])
    batch = data.TrainWindows(td.train, 16, 8, 0, 0, 1)[3]
    assert batch["ids"].shape == (8, 16)


def test_the_document_index_points_at_each_documents_bos(corpus, tmp_path, small_shards):
    td = data.prepare(data_cfg(corpus, tmp_path))
    folder = next(p for p in (tmp_path / "cache").glob("*-byte") if p.is_dir())
    starts = shards.documents_index(folder, td.meta, "train")
    assert len(starts) == td.meta["train"]["documents"]
    assert (td.train[starts] == tokenizer.BOS).all()
    assert (np.asarray(td.train) == tokenizer.BOS).sum() == len(starts)


def test_an_interrupted_build_resumes_without_redoing_finished_shards(corpus, tmp_path, small_shards, monkeypatch):
    cfg = data_cfg(corpus, tmp_path)
    flushes = []
    real = shards.ShardWriter.flush

    def flush_then_die(self, docs_done):
        real(self, docs_done)
        flushes.append(docs_done)
        if len(flushes) == 2:
            raise KeyboardInterrupt  # killed after two finished shards

    monkeypatch.setattr(shards.ShardWriter, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg)
    folder = next(p for p in (tmp_path / "cache").glob("*-byte") if p.is_dir())
    assert not (folder / "meta.json").exists() and (folder / "progress.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("train-*.bin")}
    assert len(done) == 2
    monkeypatch.setattr(shards.ShardWriter, "flush", real)
    encoded = []
    real_encode = tokenizer.ByteTokenizer.encode_batch
    monkeypatch.setattr(
        tokenizer.ByteTokenizer, "encode_batch", lambda self, t: encoded.extend(t) or real_encode(self, t)
    )
    resumed = data.prepare(cfg)
    assert {p: (folder / p).stat().st_mtime_ns for p in done} == done  # finished shards untouched
    assert not (folder / "progress.json").exists()
    docs = corpora.documents(corpora.corpus_files(str(corpus)))
    assert 0 < len(encoded) < len(docs) and encoded == docs[flushes[1] :]
    fresh = data.prepare(data_cfg(corpus, tmp_path / "fresh"))
    assert np.array_equal(resumed.train[:], fresh.train[:]) and np.array_equal(resumed.val[:], fresh.val[:])


def test_bpe_trains_on_the_first_sample_bytes_of_train_documents(corpus, tmp_path):
    cfg = data_cfg(corpus, tmp_path, kind="bpe", vocab_size=300, sample_bytes=20_000)
    sample = data.tokenizer_sample(cfg, "x")
    assert 20_000 <= sum(len(d.encode()) for d in sample) < 20_000 + corpora.DOC_CHARS * 4 + 1
    assert all(shards.doc_key(d) >= cfg.val_fraction for d in sample)
    td = data.prepare(cfg)
    assert td.tokenizer.vocab_size <= 300 and td.meta["train"]["tokens"] > 0


def test_the_second_run_finds_the_cache_without_reading_the_corpus(corpus, tmp_path, monkeypatch):
    cfg = data_cfg(corpus, tmp_path)
    first = data.prepare(cfg)
    monkeypatch.setattr(corpora, "iter_texts", lambda *a: pytest.fail("read the corpus again"))
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    second = data.prepare(cfg)
    assert not any(str(corpus) in r for r in reads)  # content digests come from the fingerprints
    assert np.array_equal(first.train[:], second.train[:])


def test_an_edited_corpus_file_gets_a_new_cache(corpus, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(corpus.read_text())
    a = data.prepare(data_cfg(src, tmp_path))
    src.write_text(src.read_text() + "\n\nA new paragraph at the end.\n")
    b = data.prepare(data_cfg(src, tmp_path))
    assert len(b.train) + len(b.val) > len(a.train) + len(a.val)


def cache_folder(tmp_path):
    return next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "fingerprints")


@pytest.mark.parametrize(
    "damage, words",
    [
        ("ids", "does not match its checksum"),  # a shard overwritten with ids outside the vocabulary
        ("truncate", "not the"),
        ("delete", "is missing"),
    ],
)
def test_a_damaged_shard_is_named_and_rebuilt_to_the_same_tokens(corpus, tmp_path, small_shards, caplog, damage, words):
    cfg = data_cfg(corpus, tmp_path, kind="bpe", vocab_size=300, sample_bytes=50_000)
    first = data.prepare(cfg)
    train, val = np.array(first.train[:]), np.array(first.val[:])
    shard = cache_folder(tmp_path) / first.meta["train"]["shards"][1]["file"]
    del first
    if damage == "ids":
        tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
        tokens[10:20] = 65_000
        tokens.flush()
        del tokens
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    again = data.prepare(cfg)
    assert f"{shard.name}" in caplog.text and words in caplog.text and "rebuilding" in caplog.text
    assert np.array_equal(np.asarray(again.train[:]), train) and np.array_equal(np.asarray(again.val[:]), val)


def test_every_shard_records_a_checksum(corpus, tmp_path, small_shards):
    td = data.prepare(data_cfg(corpus, tmp_path))
    assert all(len(sh["blake2b"]) == 32 for s in shards.SPLITS for sh in td.meta[s]["shards"])
    assert shards.damage(cache_folder(tmp_path), td.meta) == ""


def test_a_full_disk_while_building_the_cache_is_one_paragraph_naming_the_cache(corpus, tmp_path, monkeypatch):
    from escarda_lab.errors import UserError

    def full(self, docs_done):  # what numpy's tofile raises when the disk fills mid-shard
        raise OSError("198200 requested and 22528 written")

    monkeypatch.setattr(shards.ShardWriter, "flush", full)
    with pytest.raises(UserError) as e:
        data.prepare(data_cfg(corpus, tmp_path))
    assert e.value.key == "data.cache_dir" and "no space left" in str(e.value) and "resumes" in str(e.value)
