"""A probe task's data: a fixed test set and a training set (fixed, or an endless stream), both
from the data seed, never sharing an input sequence; tokens already shifted to model ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from escarda_lab.probes import IGNORE, N_SPECIALS, TASKS, need, params


@dataclass
class ProbeSet:
    """Task tokens already shifted to model ids; labels -100 where nothing is scored."""

    task: str
    params: dict
    train_inputs: np.ndarray | None  # [N, T] (None: an endless stream)
    train_labels: np.ndarray | None
    test_inputs: np.ndarray  # [M, T]
    test_labels: np.ndarray
    seed: int
    seq_len: int

    def batch(self, k: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Training batch k (a function of (seed, k) only, so a resumed run continues exactly)."""
        rng = np.random.default_rng([seed, k, 3])
        if self.train_inputs is not None:
            rows = rng.integers(len(self.train_inputs), size=size)
            return self.train_inputs[rows], self.train_labels[rows]
        pairs = [self.example(rng, train=True, avoid=self.test_keys) for _ in range(size)]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def example(self, rng, train: bool, avoid: set | None = None) -> tuple[np.ndarray, np.ndarray]:
        t = TASKS[self.task]
        extra = (self.table,) if t.table else ()
        while True:
            x, y = t.generate(self.params, self.seq_len, rng, train, *extra)
            if avoid is None or key(x) not in avoid:
                return shift(x), shift(y)

    def __post_init__(self):
        t = TASKS[self.task]
        self.table = t.table(self.params, self.seed) if t.table else None
        self.test_keys = {key(x - N_SPECIALS) for x in self.test_inputs} if self.test_inputs is not None else set()


def key(x: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.int64).tobytes(), digest_size=16).digest()


def shift(x: np.ndarray) -> np.ndarray:
    """Task tokens -> model ids (labels keep -100)."""
    x = np.asarray(x, dtype=np.int64)
    return np.where(x == IGNORE, IGNORE, x + N_SPECIALS)


def build(task: str, cfg, seq_len: int, seed: int) -> ProbeSet:
    """The test set (num_test_examples distinct sequences) and the training set (distinct from
    every test sequence), both from `seed`."""
    p = params(task, cfg)
    s = ProbeSet(task, p, None, None, None, None, seed, seq_len)  # type: ignore[arg-type]
    rng = np.random.default_rng([seed, 1])
    test, seen = [], set()
    for _ in range(50 * p["num_test_examples"]):
        x, y = s.example(rng, train=False)
        if key(x - N_SPECIALS) not in seen:
            seen.add(key(x - N_SPECIALS))
            test.append((x, y))
        if len(test) == p["num_test_examples"]:
            break
    need(
        len(test) == p["num_test_examples"],
        "num_test_examples",
        f"the task has fewer than {p['num_test_examples']} distinct sequences",
        "lower num_test_examples or raise vocab_size / seq_len",
    )
    s.test_inputs, s.test_labels = np.stack([x for x, _ in test]), np.stack([y for _, y in test])
    s.test_keys = seen
    if p["num_train_examples"]:
        rng = np.random.default_rng([seed, 2])
        train = [s.example(rng, train=True, avoid=seen) for _ in range(p["num_train_examples"])]
        s.train_inputs, s.train_labels = np.stack([x for x, _ in train]), np.stack([y for _, y in train])
    return s


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Exact match at the scored positions (labels != -100)."""
    scored = labels != IGNORE
    return float((predictions[scored] == labels[scored]).mean()) if scored.any() else float("nan")
