"""Probe tasks: small synthetic tasks that each isolate one capability (`data.corpus: probe:<task>`).

Sources, whose parameter names and defaults are kept:
- MAD (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures", arXiv
  2403.17844; github.com/athms/mad-lab): in_context_recall, fuzzy_recall, noisy_recall,
  selective_copying, compression, memorization. Training labels of the three recall tasks are the
  next tokens (MAD trains them as plain language modelling); their test labels, and every other
  task's labels, are the scored positions only.
- Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
  Models", arXiv 2312.04927; github.com/HazyResearch/zoology): mqar, multi-query associative recall
  with power-law query gaps.
- induction (Olsson et al. 2022, "In-context Learning and Induction Heads"): a random segment
  repeated at random offsets; the continuation of the repeat is scored wherever the prompt
  determines it (the current token occurs exactly once before). A fixed period would let one
  layer solve it by relative position; random offsets need an induction head (two layers).
- ngram_facts: a fixed table of (ngram-1)-token contexts -> answer token, embedded in noise; the
  facts are the same in every sequence, so they can only be memorised (what engram and hash
  lookup claim to do).
- compression, here: MAD decodes the sequence from the compression token's state alone; a causal
  LM keeps attention to the sequence, so here it is recall of the whole sequence after the token,
  without teacher forcing (dense copying).

Every task writes tokens 0..vocab_size-1; the model sees them shifted past the specials (ids 8..),
so <pad> stays free. Each example is (inputs [T], labels [T]) with -100 where nothing is scored;
labels are aligned with inputs (label t is the answer at position t). The train set (fixed, or an
endless stream when num_train_examples is 0) and the test set come from the data seed and never
share an input sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Optional, get_type_hints

import numpy as np

from escarda_lab.registry import bounded

IGNORE = -100
N_SPECIALS = 8  # tokenizer.SPECIALS: task token t is model id t + N_SPECIALS


@dataclass
class TaskConfig:
    """What every probe task takes (MAD's names). A task's config class adds its own parameters
    with the source's defaults; `data.probe` sets any of them (null: the task's default)."""

    num_train_examples: int = bounded(12_800, min=0)  # 0: an endless stream
    num_test_examples: int = bounded(1_280, min=1)


@dataclass
class MQARConfig(TaskConfig):
    vocab_size: int = bounded(8192, min=4)
    num_kv_pairs: int = bounded(8, min=1)
    power_a: float = bounded(0.01, above=0)  # query-gap power law
    random_non_queries: bool = True


@dataclass
class RecallConfig(TaskConfig):
    vocab_size: int = bounded(16, min=4)
    multi_query: bool = True
    noise_vocab_size: int = bounded(0, min=0)
    frac_noise: float = bounded(0.0, min=0, below=1)


@dataclass
class FuzzyRecallConfig(RecallConfig):
    k_motif_size: int = bounded(3, min=1)
    v_motif_size: int = bounded(3, min=1)


@dataclass
class NoisyRecallConfig(RecallConfig):
    vocab_size: int = bounded(32, min=4)
    noise_vocab_size: int = bounded(16, min=0)
    frac_noise: float = bounded(0.2, min=0, below=1)


@dataclass
class SelectiveCopyingConfig(TaskConfig):
    vocab_size: int = bounded(16, min=4)
    num_tokens_to_copy: int = bounded(16, min=1)


@dataclass
class VocabConfig(TaskConfig):
    vocab_size: int = bounded(16, min=4)


@dataclass
class MemorizationConfig(TaskConfig):
    vocab_size: int = bounded(256, min=4)


@dataclass
class InductionConfig(TaskConfig):
    num_train_examples: int = bounded(0, min=0)
    vocab_size: int = bounded(64, min=4)
    segment_len: int = bounded(16, min=2)


@dataclass
class NgramFactsConfig(TaskConfig):
    vocab_size: int = bounded(64, min=4)
    num_facts: int = bounded(256, min=1)
    ngram: int = bounded(3, min=2)
    facts_per_sequence: int = bounded(8, min=1)


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable  # (params, seq_len, rng, train[, table]) -> (inputs [T], labels [T]) in task tokens
    config: type[TaskConfig]
    seq_len: int  # the source's sequence length (the experiment files set data.seq_len)
    table: Callable | None = None  # (params, seed) -> fixed facts shared by every sequence


TASKS: dict[str, Task] = {}


def probe_task(name: str, config: type[TaskConfig], seq_len: int, table: Callable | None = None):
    """Register a generator as `data.corpus: probe:<name>`, with its parameters' config class."""

    def register(generate: Callable) -> Callable:
        if not (isinstance(config, type) and issubclass(config, TaskConfig)):
            raise TypeError(f"probe task {name!r}: its config must subclass probes.TaskConfig")
        TASKS[name] = Task(name, generate, config, seq_len, table)
        return generate

    return register


class ProbeError(ValueError):
    """An impossible task setting: (key under data.probe, problem, fix)."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(problem)


def need(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ProbeError(key, problem, fix)


# ------------------------------------------------------------------------------------ the tasks
# Each generator: (params, seq_len, rng, train) -> (inputs [T], labels [T]), task tokens.


def shifted(tokens: list, targets: list, train: bool, T: int) -> tuple[np.ndarray, np.ndarray]:
    """T + 1 tokens -> inputs [:-1]; labels: next tokens when training (MAD's recall), else
    targets. T tokens get one unscored filler at the end."""
    tokens, targets = np.asarray(tokens, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    labels = tokens[1:].copy() if train else targets[1:]
    if len(tokens) == T:
        return tokens, np.append(labels, IGNORE)
    return tokens[:-1], labels


def recall_vocab(p: dict, specials: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys, values and noise tokens of the recall tasks (MAD's split of the vocabulary)."""
    n = p["vocab_size"] - specials - p["noise_vocab_size"]
    need(n >= 2, "vocab_size", f"vocab_size={p['vocab_size']} leaves {n} key/value tokens", "raise vocab_size")
    return np.arange(n // 2), np.arange(n // 2, n), np.arange(n, n + p["noise_vocab_size"])


@probe_task("in_context_recall", RecallConfig, seq_len=128)
def in_context_recall(p: dict, T: int, rng: np.random.Generator, train: bool):
    """Key-value pairs (a key's value is fixed within the sequence); the value after a key seen
    before is scored (multi_query), or only the final probe after a copy token."""
    mq = p["multi_query"]
    keys, values, noise = recall_vocab(p, 0 if mq else 1)
    need(p["frac_noise"] == 0 or len(noise) > 0, "noise_vocab_size", "frac_noise > 0 needs noise tokens", "set it > 0")
    need(T % 2 == 0, "seq_len", f"data.seq_len={T} must be even (key-value pairs)", "use an even seq_len")
    kv: dict[int, int] = {}
    tokens, targets = [], []
    n_pairs = T // 2  # the last one is the probe (after a copy token unless multi_query)
    keep = rng.integers(n_pairs - 1) if n_pairs > 1 else 0  # one pair that is never noise
    for i in range(n_pairs - 1):
        if p["frac_noise"] > 0 and i != keep and rng.random() < p["frac_noise"]:
            tokens += list(rng.choice(noise, 2))
            targets += [IGNORE, IGNORE]
            continue
        k = int(rng.choice(keys))
        seen = k in kv
        v = kv.setdefault(k, int(rng.choice(values)))
        tokens += [k, v]
        targets += [IGNORE, v if (seen and mq) else IGNORE]
    k = int(rng.choice(sorted(kv))) if kv else int(rng.choice(keys))
    v = kv.setdefault(k, int(rng.choice(values)))
    if not mq:
        tokens.append(p["vocab_size"] - 1)
        targets.append(IGNORE)
    tokens += [k, v]
    targets += [IGNORE, v]
    return shifted(tokens, targets, train, T)


@probe_task("fuzzy_recall", FuzzyRecallConfig, seq_len=128)
def fuzzy_recall(p: dict, T: int, rng: np.random.Generator, train: bool):
    """Keys and values are runs of 1..k_motif_size / 1..v_motif_size tokens (test keys always
    k_motif_size long); the padding before the sequence is one more token."""
    mq, K, V = p["multi_query"], p["k_motif_size"], p["v_motif_size"]
    keys, values, noise = recall_vocab(p, 1 if mq else 2)
    need(
        len(keys) >= K,
        "k_motif_size",
        f"k_motif_size={K} needs {K} key tokens, the vocabulary has {len(keys)}",
        "raise vocab_size",
    )
    need(len(values) >= V, "v_motif_size", f"v_motif_size={V} needs {V} value tokens", "raise vocab_size")
    pad = p["vocab_size"] - (1 if mq else 2)
    need(T > 4 * (K + V), "seq_len", f"data.seq_len={T} is too short for motifs of {K}+{V}", "use seq_len > 4 (k + v)")
    motif = lambda vocab, size: tuple(int(x) for x in rng.choice(vocab, size, replace=False))
    k_size = lambda: int(rng.integers(1, K + 1)) if train else K
    probe_k, probe_v = motif(keys, k_size()), motif(values, int(rng.integers(1, V + 1)))
    end = T - len(probe_k) - len(probe_v) - (K + V)  # room left for the final probe
    probe_at = int(rng.integers(max(1, end - (K + V))))  # so that the probe pair is always placed
    kv: dict[tuple, tuple] = {}
    tokens, targets, placed = [], [], False
    while len(tokens) < end:
        if len(tokens) >= probe_at and not placed:
            k, v, placed = probe_k, probe_v, True
        elif p["frac_noise"] > 0 and rng.random() < p["frac_noise"]:
            n = k_size() + int(rng.integers(1, V + 1))
            tokens += [int(x) for x in rng.choice(noise, n)]
            targets += [IGNORE] * n
            continue
        else:
            k = motif(keys, k_size())
            v = probe_v if k == probe_k else kv.get(k) or motif(values, int(rng.integers(1, V + 1)))
            placed = placed or k == probe_k
        seen = k in kv
        kv[k] = v
        tokens += [*k, *v]
        targets += [IGNORE] * len(k) + (list(v) if seen and mq else [IGNORE] * len(v))
    if not mq:
        tokens.append(p["vocab_size"] - 1)
        targets.append(IGNORE)
    tokens += [*probe_k, *probe_v]
    targets += [IGNORE] * len(probe_k) + list(probe_v)
    n_pad = T + 1 - len(tokens)
    return shifted([pad] * n_pad + tokens, [IGNORE] * n_pad + targets, train, T)


@probe_task("noisy_recall", NoisyRecallConfig, seq_len=128)
def noisy_recall(p: dict, T: int, rng: np.random.Generator, train: bool):
    """in_context_recall with a fraction of the pairs replaced by noise tokens."""
    return in_context_recall(p, T, rng, train)


@probe_task("selective_copying", SelectiveCopyingConfig, seq_len=256)
def selective_copying(p: dict, T: int, rng: np.random.Generator, train: bool):
    """num_tokens_to_copy tokens scattered among blanks, a copy token, then blanks: the tokens are
    to be written in order at the blanks after the copy token (not teacher-forced)."""
    n, V = p["num_tokens_to_copy"], p["vocab_size"]
    need(V >= 3, "vocab_size", "selective_copying needs vocab_size >= 3", "raise vocab_size")
    need(
        T > 2 * n + 1,
        "num_tokens_to_copy",
        f"{n} tokens to copy do not fit data.seq_len={T}",
        f"use seq_len > {2 * n + 1}",
    )
    blank, copy = V - 2, V - 1
    word = rng.integers(V - 2, size=n)
    slots = np.sort(rng.choice(T - n - 1, n, replace=False))
    first = np.full(T - n - 1, blank)
    first[slots] = word
    inputs = np.concatenate([first, [copy], np.full(n, blank)])
    labels = np.concatenate([np.full(T - n, IGNORE), word])
    return inputs, labels


@probe_task("compression", VocabConfig, seq_len=32)
def compression(p: dict, T: int, rng: np.random.Generator, train: bool):
    """T/2 random tokens, then the compression token T/2 times: recall the sequence in order."""
    V, n = p["vocab_size"], T // 2
    word = rng.integers(V - 1, size=n)
    return np.concatenate([word, np.full(T - n, V - 1)]), np.concatenate([np.full(T - n, IGNORE), word])


def memorization_table(p: dict, seed: int) -> dict[int, int]:
    """The fixed key -> value map of `memorization` (the same in every sequence and split)."""
    n = p["vocab_size"] - 1
    rng = np.random.default_rng([seed, 77])
    keys, values = rng.permutation(n // 2), rng.permutation(np.arange(n // 2, n))
    return {int(k): int(v) for k, v in zip(keys, values)}


@probe_task("memorization", MemorizationConfig, seq_len=32, table=memorization_table)
def memorization(p: dict, T: int, rng: np.random.Generator, train: bool, table: dict):
    """(key, insert token) pairs; at the insert token the key's fixed value is scored. The value
    is never shown, so it can only come from the weights."""
    need(T % 2 == 0, "seq_len", f"data.seq_len={T} must be even (key, insert)", "use an even seq_len")
    insert = p["vocab_size"] - 1
    keys = rng.choice(np.array(sorted(table)), T // 2)
    inputs = np.stack([keys, np.full_like(keys, insert)], 1).reshape(-1)
    labels = np.stack([np.full_like(keys, IGNORE), [table[int(k)] for k in keys]], 1).reshape(-1)
    return inputs, labels


@probe_task("mqar", MQARConfig, seq_len=64)
def mqar(p: dict, T: int, rng: np.random.Generator, train: bool):
    """num_kv_pairs distinct keys with values up front; then each key once as a query, at gaps
    drawn from a power law (a * x^(a-1)); the value is scored at the query. Token 0 is the filler
    (or a random token with random_non_queries)."""
    V, D = p["vocab_size"], p["num_kv_pairs"]
    ctx = 2 * D
    space = (T - ctx) // 2
    need(
        space >= D, "num_kv_pairs", f"{D} pairs and {D} queries do not fit data.seq_len={T}", f"use seq_len >= {4 * D}"
    )
    need(V // 2 - 1 >= D, "vocab_size", f"vocab_size={V} has fewer than {D} keys", f"use vocab_size >= {2 * D + 2}")
    keys = rng.choice(np.arange(1, V // 2), D, replace=False)
    values = rng.choice(np.arange(V // 2, V), D, replace=V - V // 2 < D)
    x = np.arange(1, space + 1, dtype=np.float64)
    weights = p["power_a"] * x ** (p["power_a"] - 1)
    gaps = rng.choice(space, D, replace=False, p=weights / weights.sum())
    inputs = np.zeros(T, dtype=np.int64)
    inputs[0:ctx:2], inputs[1:ctx:2] = keys, values
    labels = np.full(T, IGNORE)
    inputs[ctx + 2 * gaps], labels[ctx + 2 * gaps] = keys, values
    if p["random_non_queries"]:
        filler = inputs == 0
        inputs[filler] = rng.integers(V, size=int(filler.sum()))
    return inputs, labels


@probe_task("induction", InductionConfig, seq_len=64)
def induction(p: dict, T: int, rng: np.random.Generator, train: bool):
    """Random tokens with one segment written twice at random offsets; after the repeat starts,
    each next token is scored where the current token occurs exactly once earlier."""
    V, L = p["vocab_size"], p["segment_len"]
    need(
        2 * L <= T + 1,
        "segment_len",
        f"two segments of {L} do not fit data.seq_len={T}",
        f"use segment_len <= {(T + 1) // 2}",
    )
    tokens = rng.integers(V, size=T + 1)
    a = int(rng.integers(T + 2 - 2 * L))
    b = int(rng.integers(a + L, T + 2 - L))
    tokens[b : b + L] = tokens[a : a + L]
    labels = np.full(T + 1, IGNORE)
    for t in range(b, b + L - 1):
        if np.count_nonzero(tokens[:t] == tokens[t]) == 1:
            labels[t] = tokens[t + 1]
    return tokens[:-1], labels[:-1]


def ngram_facts_table(p: dict, seed: int) -> dict[tuple, int]:
    """num_facts distinct (ngram-1)-token contexts of key tokens -> an answer token."""
    V, n = p["vocab_size"], p["ngram"] - 1
    n_keys = V // 2
    need(
        p["num_facts"] <= n_keys**n,
        "num_facts",
        f"{p['num_facts']} facts need more than the {n_keys}^{n} contexts",
        "raise vocab_size or ngram",
    )
    rng = np.random.default_rng([seed, 78])
    picks = rng.choice(n_keys**n, p["num_facts"], replace=False)
    contexts = [tuple(int(c) for c in np.unravel_index(i, (n_keys,) * n)) for i in picks]
    return {c: int(a) for c, a in zip(contexts, rng.integers(V // 2, 3 * V // 4, size=len(contexts)))}


@probe_task("ngram_facts", NgramFactsConfig, seq_len=64, table=ngram_facts_table)
def ngram_facts(p: dict, T: int, rng: np.random.Generator, train: bool, table: dict):
    """Noise tokens with facts (context, answer) written at random places; the answer is scored."""
    V, n, k = p["vocab_size"], p["ngram"], p["facts_per_sequence"]
    need(V >= 8, "vocab_size", "ngram_facts needs vocab_size >= 8", "raise vocab_size")
    need(
        k * (n + 1) <= T + 1,
        "facts_per_sequence",
        f"{k} facts of {n} tokens do not fit data.seq_len={T}",
        "use fewer facts or a longer seq_len",
    )
    tokens = rng.integers(3 * V // 4, V, size=T + 1)
    labels = np.full(T + 1, IGNORE)
    # k slots of n tokens with at least one noise token between them
    free = T + 1 - k * (n + 1)
    starts = np.sort(rng.choice(free + k, k, replace=False)) + np.arange(k) * n
    contexts = list(table)
    for s in starts:
        ctx = contexts[int(rng.integers(len(contexts)))]
        tokens[s : s + n - 1] = ctx
        tokens[s + n - 1] = table[ctx]
        labels[s + n - 2] = table[ctx]
    return tokens[:-1], labels[:-1]


def task_of(corpus: str) -> str | None:
    return corpus[len("probe:") :] if corpus.startswith("probe:") else None


def union_config() -> type:
    """`data.probe`'s schema: every registered task's parameters, each optional (null: the
    task's default), with the bounds its task gives it."""
    seen: dict[str, tuple] = {}
    for t in TASKS.values():
        hints = get_type_hints(t.config)
        for f in fields(t.config):
            seen.setdefault(f.name, (f.name, Optional[hints[f.name]], field(default=None, metadata=f.metadata)))  # noqa: UP045
    return make_dataclass("ProbeConfig", list(seen.values()))


def params(task: str, cfg) -> dict:
    """The task's parameters: its config's defaults, overridden by the non-null fields of `cfg`
    (a `data.probe` node); a field the task does not take is an error."""
    out = asdict(TASKS[task].config())
    for name, value in vars(cfg).items():
        if value is None:
            continue
        need(
            name in out,
            name,
            f"{task} has no parameter {name}",
            f"remove it; {task} takes {', '.join(sorted(out))}",
        )
        out[name] = value
    return out


def vocab_size(task: str, cfg) -> int:
    """Model vocabulary: the specials plus the task's tokens."""
    return N_SPECIALS + params(task, cfg)["vocab_size"]


ProbeConfig = union_config()  # the shipped tasks' schema; config.schema_class rebuilds it with added tasks
