"""Evaluation: bpb on the run's split and on text, minimal pairs, multiple choice (lm-eval's rules)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from escarda_lab import evaluate
from escarda_lab import minimal_pairs as mp
from escarda_lab.errors import DataError
from escarda_lab.model import EscardaLM
from escarda_lab.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def byte_model(tiny_model_cfg):
    cfg = tiny_model_cfg(vocab_size=264, max_seq_len=32)
    torch.manual_seed(0)
    return EscardaLM(cfg).eval()


@pytest.fixture(scope="module")
def scorer(byte_model):
    return evaluate.Scorer(byte_model, ByteTokenizer(), batch_size=3)


@torch.no_grad()
def brute_logprob(model, ids: list[int], n: int) -> float:
    """log P of the last n tokens of ids, one unbatched forward."""
    logp = model(torch.tensor([ids[:-1]])).logits.float().log_softmax(-1)[0]
    return float(sum(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]] for j in range(n)))


# ---------------------------------------------------------------------------------- scoring


def test_loglikelihood_equals_an_unbatched_forward(scorer, byte_model):
    tok = ByteTokenizer()
    reqs = [("The king", " speaks."), ("A", " b"), ("", "Hello there")]
    got = scorer.loglikelihood(reqs)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        ids = [tok.bos_id] + tok.encode(ctx + cont)
        assert lp == pytest.approx(brute_logprob(byte_model, ids, len(tok.encode(cont))), abs=1e-4)


def test_trailing_context_space_moves_to_the_continuation(scorer):
    ctx, cont = scorer.encode_pair("The king ", "speaks")
    assert ByteTokenizer().decode(cont) == " speaks" and ByteTokenizer().decode(ctx[1:]) == "The king"


@pytest.mark.parametrize("stride", [None, 7, 1])
def test_rolling_windows_predict_every_token_once_within_the_context(scorer, monkeypatch, stride):
    text = "the quick brown fox jumps over the lazy dog " * 3  # 132 tokens, context 32
    pieces = []
    real = scorer._score
    monkeypatch.setattr(scorer, "_score", lambda enc: pieces.extend(enc) or real(enc))
    scorer.loglikelihood_rolling([text], stride)
    ids = [ByteTokenizer().bos_id] + ByteTokenizer().encode(text)
    assert [t for _, cont in pieces for t in cont] == ids[1:]  # every token predicted, once, in order
    assert all(len(ctx) + len(cont) <= scorer.max_len + 1 for ctx, cont in pieces)  # fits the window
    start = 1
    for ctx, cont in pieces:  # each window is the text itself: the context just before its tokens
        assert ctx + cont == ids[start - len(ctx) : start + len(cont)]
        start += len(cont)


def test_rolling_short_text_equals_one_forward(scorer, byte_model):
    ids = [ByteTokenizer().bos_id] + ByteTokenizer().encode("short text")
    assert scorer.loglikelihood_rolling(["short text"])[0] == pytest.approx(
        brute_logprob(byte_model, ids, len(ids) - 1), abs=1e-4
    )


def test_text_bpb_counts_utf8_bytes(scorer):
    res = evaluate.text_bpb(scorer, "héllo wörld")
    assert res["bytes"] == len("héllo wörld".encode())
    assert res["byte_perplexity"] == pytest.approx(2 ** res["bpb"])
    assert res["bpb"] == pytest.approx(res["nll"] / (math.log(2) * res["bytes"]))


# ---------------------------------------------------------------------------- multiple choice


class FixedScorer:
    """A scorer returning given log-likelihoods in request order."""

    def __init__(self, lls):
        self.lls, self.requests = lls, []

    def loglikelihood(self, requests):
        self.requests += requests
        return [(x, False) for x in self.lls]


def test_multiple_choice_matches_a_hand_computed_example():
    docs = [evaluate.Choice("Q1", ["a", "bbbb"], 1), evaluate.Choice("Q2", ["cc", "d"], 0)]
    # Q1: lls -1 vs -2 -> acc picks "a" (wrong); per char -1/1 vs -2/4 = -0.5 -> acc_norm picks "bbbb" (right)
    # Q2: lls -3 vs -2 -> acc picks "d" (wrong); per char -1.5 vs -2 -> acc_norm picks "cc" (right)
    fixed = FixedScorer([-1.0, -2.0, -3.0, -2.0])
    res = evaluate.multiple_choice(fixed, docs)
    assert fixed.requests == [("Q1", " a"), ("Q1", " bbbb"), ("Q2", " cc"), ("Q2", " d")]
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0 and res["n"] == 2
    assert res["acc_stderr"] == 0.0


def test_multiple_choice_stderr_is_the_sample_std_over_root_n():
    docs = [evaluate.Choice("Q", ["a", "b"], 0)] * 4
    res = evaluate.multiple_choice(FixedScorer([-1.0, -2.0, -2.0, -1.0, -1.0, -2.0, -1.0, -2.0]), docs)
    assert res["acc"] == 0.75  # hits 1, 0, 1, 1
    assert res["acc_stderr"] == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    docs = [evaluate.Choice("Q", ["é", "ab"], 0)]  # 1 char / 2 bytes vs 2 chars / 2 bytes
    res = evaluate.multiple_choice(FixedScorer([-1.5, -2.0]), docs)
    assert res["acc_norm"] == 0.0  # -1.5 vs -1.0: "ab"
    assert res["acc_bytes"] == 1.0  # -0.75 vs -1.0: "é"


def test_a_broken_task_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "b", "choices": ["x"]}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2"):
        evaluate.read_task(path)


# ----------------------------------------------------------------------------- minimal pairs


def test_every_paradigm_has_at_least_150_distinct_pairs():
    pairs = mp.generate(per_paradigm=150)
    counts = Counter(p.paradigm for p in pairs)
    assert len(counts) >= 8 and all(n == 150 for n in counts.values())
    assert len({(p.good, p.bad) for p in pairs}) == len(pairs)


def test_pairs_are_deterministic_by_seed():
    assert mp.generate(20, seed=3) == mp.generate(20, seed=3)
    assert mp.generate(20, seed=3) != mp.generate(20, seed=4)


EXPECTED_DIFFERENCE = {  # what may differ between the good and the bad word
    "sv_agreement": "verb",
    "sv_agreement_across_pp": "verb",
    "sv_agreement_across_rc": "verb",
    "determiner_noun_agreement": "noun",
    "anaphor_agreement": "reflexive",
    "irregular_past_participle": "participle",
    "existential_there": "be",
    "negative_polarity": "either/too",
}


def allowed(kind: str, good: str, bad: str) -> bool:
    if kind == "verb":
        return any({good, bad} == {s, p} for s, p, _ in mp.VERBS)
    if kind == "noun":
        return any({good, bad} == set(t) for t in mp.THINGS)
    if kind == "reflexive":
        return {good, bad} <= {"himself", "herself", "themselves"}
    if kind == "participle":
        return any({good, bad} == {pp, past} for past, pp, _ in mp.IRREGULAR)
    if kind == "be":
        return {good, bad} in ({"is", "are"}, {"was", "were"})
    return {good, bad} == {"either", "too"}


@pytest.fixture(scope="module")
def ngram_results():
    """Unigram and bigram word models fitted on the default training corpus, scored on 200 pairs
    of every paradigm."""
    from escarda_lab import corpora

    texts = [text for _, text in corpora.iter_texts("classics")]
    pairs = mp.generate(per_paradigm=200)
    return {n: mp.score(mp.NGramScorer(texts, n), pairs) for n in (1, 2)}


def within_chance(v: dict) -> bool:
    return abs(v["acc"] - 0.5) <= 3 * v["acc_stderr"]


@pytest.mark.parametrize("paradigm", list(mp.PARADIGMS))
def test_word_frequency_alone_decides_no_paradigm(ngram_results, paradigm):
    assert within_chance(ngram_results[1][paradigm]), ngram_results[1][paradigm]


@pytest.mark.parametrize("paradigm", list(mp.PARADIGMS))
def test_a_bigram_model_is_at_chance_unless_the_rule_is_local_or_an_attractor_traps_it(ngram_results, paradigm):
    v = ngram_results[2][paradigm]
    if paradigm in mp.LOCAL:  # the deciding word is adjacent: a bigram may know the rule
        assert v["acc"] > 0.5 - 3 * v["acc_stderr"], v
    elif paradigm in mp.ATTRACTOR:  # a word of the other number stands next to the verb
        assert v["acc"] < 0.5 + 3 * v["acc_stderr"], v
    else:
        assert within_chance(v), v


def test_negative_polarity_swaps_the_same_two_words_both_ways():
    pairs = [p for p in mp.generate(per_paradigm=200) if p.paradigm == "negative_polarity"]
    licensed = [p for p in pairs if " not " in p.good]
    assert all(p.good.endswith("either.") for p in licensed)
    assert all(p.good.endswith("too.") for p in pairs if p not in licensed)
    assert 0.4 < len(licensed) / len(pairs) < 0.6


def test_a_paradigm_below_chance_is_flagged_and_the_attractor_named():
    res = {
        "sv_agreement_across_pp": {"acc": 0.30, "acc_stderr": 0.03, "n": 200},
        "negative_polarity": {"acc": 0.45, "acc_stderr": 0.035, "n": 200},
        "sv_agreement": {"acc": 0.20, "acc_stderr": 0.03, "n": 200},
    }
    flags = mp.below_chance(res)
    assert set(flags) == {"sv_agreement_across_pp", "sv_agreement"} and "attraction" in flags["sv_agreement_across_pp"]


def test_pairs_differ_in_exactly_the_paradigm_word():
    for p in mp.generate(per_paradigm=150):
        g, b = p.good.split(" "), p.bad.split(" ")
        assert len(g) == len(b)
        diff = [i for i, (x, y) in enumerate(zip(g, b)) if x != y]
        assert diff == [p.index], p
        gw, bw = g[p.index].rstrip("."), b[p.index].rstrip(".")
        assert allowed(EXPECTED_DIFFERENCE[p.paradigm], gw.lower() if p.index == 0 else gw, bw), p


def test_minimal_pair_accuracy_counts_strictly_better_good_sentences():
    pairs = [
        mp.Pair("x", "good one", "bad one", 0),
        mp.Pair("x", "good two", "bad two", 0),
        mp.Pair("y", "good three", "bad three", 0),
    ]
    # goods then bads: pair 1 wins, pair 2 ties (a loss), pair 3 wins
    res = mp.score(FixedScorer([-1.0, -2.0, -1.0, -3.0, -2.0, -2.0]), pairs)
    assert res["x"]["acc"] == 0.5 and res["y"]["acc"] == 1.0 and res["overall"]["acc"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- CLI


def test_evaluate_reproduces_the_training_loops_val_bpb(corpus, tmp_path, capsys):
    from escarda_lab.run import main as run_main
    from tests.conftest import ROOT, tiny_overrides

    assert run_main([str(ROOT / "experiments/vanilla.yaml"), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
    folder = tmp_path / "runs" / "vanilla" / "seed0"
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "The king", "choices": ["speaks.", "xqz"], "label": 0}\n')
    text = tmp_path / "t.txt"
    text.write_text("The queen walks to the river.\n")
    assert (
        evaluate.main(
            [str(folder), "--suite", "minimal_pairs", "--pairs", "3", "--task", str(task), "--text", str(text)]
        )
        == 0
    )
    res = json.loads((folder / "eval.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert res["val"]["bpb"] == pytest.approx(metrics["val_bpb"], abs=1e-4)
    assert res["minimal_pairs"]["overall"]["n"] == 3 * 8 and res["tasks"]["task"]["n"] == 1
    assert "minimal pairs" in capsys.readouterr().out
    assert evaluate.main([str(tmp_path / "nope")]) == 2


def test_scoring_a_long_text_reports_progress(caplog, byte_model):
    scorer = evaluate.Scorer(byte_model, ByteTokenizer(), batch_size=2)
    caplog.set_level("INFO", logger="escarda_lab")
    (ll,) = scorer.loglikelihood_rolling(["the king speaks. " * 300], stride=16)
    assert ll < 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scored ")]
    assert lines and "ETA" in lines[-1] and lines[-1].startswith("scored 319/319 windows")


def test_evaluate_rebuilds_a_missing_cache_with_the_runs_tokenizer_not_a_new_one(corpus, tmp_path, monkeypatch):
    import shutil

    from escarda_lab.run import main as run_main
    from escarda_lab.tokenizer import BPETokenizer
    from tests.conftest import ROOT, tiny_overrides

    cache = tmp_path / "cache"
    over = tiny_overrides(corpus, tmp_path / "runs") + [
        "data.tokenizer.kind=bpe",
        "data.tokenizer.vocab_size=600",
        f"data.cache_dir={cache}",
    ]
    assert run_main([str(ROOT / "experiments/vanilla.yaml"), *over]) == 0
    folder = tmp_path / "runs" / "vanilla" / "seed0"
    shutil.rmtree(cache)  # the token cache is gone (another machine, a cleaned cache)
    monkeypatch.setattr(BPETokenizer, "train", classmethod(lambda *a: pytest.fail("evaluate trained a tokenizer")))
    assert evaluate.main([str(folder)]) == 0
    res = json.loads((folder / "eval.json").read_text())
    assert res["val"]["bpb"] == pytest.approx(json.loads((folder / "metrics.json").read_text())["val_bpb"], abs=1e-4)


@pytest.mark.parametrize(
    "content", [b"", b"  \n\n", b"\x00" * 500, bytes(range(256)) * 8], ids=["empty", "blank", "nul", "binary"]
)
def test_evaluate_refuses_a_text_with_nothing_to_score(content, tmp_path, capsys):
    from escarda_lab.run import main as run_main
    from tests.conftest import ROOT, make_text

    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(200))
    over = [f"data.corpus={corpus}", "data.tokenizer.kind=byte", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.head_dim=16", "model.n_kv_heads=1", "model.ffn_hidden=64",
            "train.max_steps=2", "train.warmup_steps=1", f"output.dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert run_main([str(ROOT / "experiments/vanilla.yaml"), *over]) == 0
    folder = tmp_path / "runs" / "vanilla" / "seed0"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert evaluate.main([str(folder), "--no-split", "--text", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and ("empty" in err or "not UTF-8 text" in err) and "Traceback" not in err
    assert not (folder / "eval.json").exists()


def test_bpb_standard_error_is_zero_when_every_batch_has_the_same_rate():
    rows = torch.tensor([[2.0, 4, 3, 0], [4.0, 8, 6, 0], [6.0, 9, 9, 0]], dtype=torch.float64)
    assert evaluate.bpb_se(rows) == pytest.approx(0.0, abs=1e-12)


def test_bpb_standard_error_shrinks_as_one_over_root_batches():
    g = torch.Generator().manual_seed(0)
    rows = torch.stack(
        [torch.rand(64, generator=g) * 3 + 1, torch.ones(64), torch.full((64,), 2.0), torch.zeros(64)], 1
    )
    once, four = evaluate.bpb_se(rows.double()), evaluate.bpb_se(rows.double().repeat(4, 1))
    assert four == pytest.approx(once / 2, rel=0.02)
