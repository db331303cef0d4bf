"""Probe tasks: every generator is deterministic, its test set is disjoint from training, and its
answers are what an independent brute-force solver reads off the prompt."""

from __future__ import annotations

import numpy as np
import pytest

from escarda_lab import probe_sets, probes
from escarda_lab.probes import IGNORE, N_SPECIALS, ProbeConfig

SMALL = {"num_train_examples": 300, "num_test_examples": 200}
SETTINGS = {
    "mqar": ({"vocab_size": 128, "num_kv_pairs": 8, **SMALL}, 64),
    "in_context_recall": ({**SMALL}, 128),
    "fuzzy_recall": ({**SMALL}, 128),
    "noisy_recall": ({**SMALL}, 128),
    "selective_copying": ({**SMALL}, 256),
    "compression": ({**SMALL}, 32),
    "memorization": ({**SMALL}, 32),
    "induction": ({"num_test_examples": 200}, 64),
    "ngram_facts": ({"num_facts": 64, **SMALL}, 64),
}


def build(task: str, seed: int = 0, **over) -> probe_sets.ProbeSet:
    kw, seq_len = SETTINGS[task]
    return probe_sets.build(task, ProbeConfig(**{**kw, **over}), seq_len, seed)


def tokens(x: np.ndarray) -> np.ndarray:
    """Model ids -> task tokens (labels keep -100)."""
    return np.where(x == IGNORE, IGNORE, x - N_SPECIALS)


def examples(s: probe_sets.ProbeSet, split: str = "test"):
    xs, ys = (s.test_inputs, s.test_labels) if split == "test" else (s.train_inputs, s.train_labels)
    return [(tokens(x), tokens(y)) for x, y in zip(xs, ys)]


def test_every_task_has_a_test_here():
    assert set(SETTINGS) == set(probes.TASKS)


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_generation_is_a_function_of_the_seed(task):
    a, b, c = build(task), build(task), build(task, seed=1)
    assert np.array_equal(a.test_inputs, b.test_inputs) and np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.test_inputs, c.test_inputs)
    for k in (0, 7):
        assert all(np.array_equal(u, v) for u, v in zip(a.batch(k, 8, 3), b.batch(k, 8, 3)))


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_train_and_test_share_no_sequence(task):
    s = build(task)
    test = {x.tobytes() for x in s.test_inputs}
    assert len(test) == len(s.test_inputs)  # the test set has no duplicate either
    train = s.train_inputs if s.train_inputs is not None else np.concatenate([s.batch(k, 64, 0)[0] for k in range(5)])
    assert not test & {x.tobytes() for x in train}


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_shapes_and_token_range(task):
    s = build(task)
    V, T = s.params["vocab_size"], s.seq_len
    for x, y in [(s.test_inputs, s.test_labels), s.batch(0, 16, 0)]:
        assert x.shape == y.shape and x.shape[1] == T
        assert x.min() >= N_SPECIALS and x.max() < N_SPECIALS + V
        scored = y[y != IGNORE]
        assert scored.min() >= N_SPECIALS and scored.max() < N_SPECIALS + V
    assert (s.test_labels != IGNORE).any(axis=1).all()  # every test example scores something


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_oracle_scores_one_and_uniform_scores_chance(task):
    s = build(task)
    y = s.test_labels
    assert probe_sets.accuracy(y, y) == 1.0
    V = s.params["vocab_size"]
    rng = np.random.default_rng(0)
    guesses = rng.integers(N_SPECIALS, N_SPECIALS + V, size=(20,) + y.shape)
    n = int((y != IGNORE).sum()) * len(guesses)
    acc = np.mean([probe_sets.accuracy(g, y) for g in guesses])
    assert abs(acc - 1 / V) < 4 * np.sqrt((1 / V) * (1 - 1 / V) / n)


# ----------------------------------------------------------------- brute-force solvers per task


def test_mqar_answers_are_a_lookup_in_the_prompt():
    s = build("mqar")
    D = s.params["num_kv_pairs"]
    for x, y in examples(s):
        table = dict(zip(x[0 : 2 * D : 2], x[1 : 2 * D : 2]))
        assert len(table) == D  # distinct keys
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) == D and scored.min() >= 2 * D
        assert sorted(x[scored]) == sorted(table)  # every key is queried once
        assert all(y[p] == table[x[p]] for p in scored)


def runs(seq: np.ndarray, is_key, is_value) -> list[tuple[tuple, tuple, int]]:
    """(key run, value run, start of the value run) for every key run followed by values."""
    out, i = [], 0
    while i < len(seq):
        if not is_key(seq[i]):
            i += 1
            continue
        j = i
        while j < len(seq) and is_key(seq[j]):
            j += 1
        k = j
        while k < len(seq) and is_value(seq[k]):
            k += 1
        if k > j:
            out.append((tuple(seq[i:j]), tuple(seq[j:k]), j))
        i = k if k > j else j
    return out


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_recall", "fuzzy_recall"])
def test_recall_answers_are_the_value_an_earlier_key_had(task):
    s = build(task)
    V, noise = s.params["vocab_size"], s.params["noise_vocab_size"]
    n = V - (1 if task == "fuzzy_recall" else 0) - noise  # multi_query: no copy token
    is_key, is_value = (lambda t: 0 <= t < n // 2), (lambda t: n // 2 <= t < n)
    for x, y in examples(s):
        seq = np.append(x, y[-1])  # the last answer is a label only
        pairs = runs(seq, is_key, is_value)
        for p in np.flatnonzero(y != IGNORE):
            assert seq[p + 1] == y[p]
            (key, value, start) = next((k, v, st) for k, v, st in pairs if st <= p + 1 < st + len(v))
            earlier = [v for k, v, st in pairs if k == key and st < start - len(key)]
            assert earlier, "a scored value must follow a key seen before"
            assert {v[p + 1 - start] for v in earlier} == {y[p]}


def test_recall_training_labels_are_the_next_tokens():
    s = build("in_context_recall")
    x, y = s.batch(0, 4, 0)
    assert np.array_equal(y[:, :-1], x[:, 1:])


def test_selective_copying_answers_are_the_tokens_before_the_copy_token_in_order():
    s = build("selective_copying")
    V = s.params["vocab_size"]
    for x, y in examples(s):
        copy_at = int(np.flatnonzero(x == V - 1)[0])
        word = [t for t in x[:copy_at] if t != V - 2]
        assert list(y[y != IGNORE]) == word
        assert np.flatnonzero(y != IGNORE).min() > copy_at
        assert (x[copy_at + 1 :] == V - 2).all()  # the answers are not shown


def test_compression_answers_are_the_sequence_before_the_token():
    s = build("compression")
    V = s.params["vocab_size"]
    for x, y in examples(s):
        at = int(np.flatnonzero(x == V - 1)[0])
        assert list(y[y != IGNORE]) == list(x[:at])


def test_memorization_facts_are_one_fixed_table_never_shown():
    s = build("memorization")
    V = s.params["vocab_size"]
    facts: dict[int, int] = {}
    for x, y in examples(s, "train") + examples(s):
        for p in np.flatnonzero(y != IGNORE):
            assert x[p] == V - 1  # scored at the insert token, after the key
            assert facts.setdefault(int(x[p - 1]), int(y[p])) == y[p]
        assert not set(x) & set(facts.values())  # values never appear in the input
    assert len(facts) <= (V - 1) // 2
    assert build("memorization", seed=1).table != s.table


def test_induction_answer_follows_the_single_earlier_occurrence():
    s = build("induction")
    for x, y in examples(s):
        scored = np.flatnonzero(y != IGNORE)
        for p in scored:
            (j,) = np.flatnonzero(x[:p] == x[p])
            assert y[p] == x[j + 1]
            if p + 1 < len(x):
                assert x[p + 1] == y[p]


def test_induction_repeat_sits_at_random_offsets():
    s = build("induction")
    first = [int(np.flatnonzero(y != IGNORE)[0]) for _, y in examples(s)]
    assert len(set(first)) > 20


def test_ngram_facts_are_a_fixed_table_of_contexts():
    s = build("ngram_facts")
    n = s.params["ngram"] - 1
    facts: dict[tuple, int] = {}
    for x, y in examples(s, "train") + examples(s):
        for p in np.flatnonzero(y != IGNORE):
            ctx = tuple(x[p - n + 1 : p + 1])
            assert facts.setdefault(ctx, int(y[p])) == y[p]
            assert ctx in s.table and s.table[ctx] == y[p]
    assert len(facts) <= s.params["num_facts"]
    assert len(facts) > 0.9 * s.params["num_facts"]  # the training set shows (nearly) every fact


# ------------------------------------------------------------------------------------ settings


def test_unused_parameter_is_an_error_naming_it():
    with pytest.raises(probes.ProbeError) as e:
        probes.params("induction", ProbeConfig(num_kv_pairs=4))
    assert e.value.key == "num_kv_pairs" and "segment_len" in e.value.fix


def test_impossible_shape_is_an_error_naming_the_key():
    with pytest.raises(probes.ProbeError) as e:
        probe_sets.build("mqar", ProbeConfig(vocab_size=256, num_kv_pairs=32, num_test_examples=4), 64, 0)
    assert e.value.key == "num_kv_pairs"
