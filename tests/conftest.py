"""Shared fixtures: a generated corpus, tiny configs, and a private token cache per session."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from escarda_lab import config  # noqa: E402

torch.set_flush_denormal(True)

WORDS = (
    "the a one every some king queen lord lady knight fool city forest river house night "
    "day love war letter sword crown speaks walks sees loves hates finds keeps gives takes "
    "old young brave quiet proud and but or then".split()
)


def make_text(n_paragraphs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sents = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    os.environ["ESCARDA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # child processes (grid runs, DDP ranks) import tests.plugins.dummy like this process does
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of generated prose in one file (about ten documents)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_text(1500))
    return path


def tiny_overrides(corpus: Path, out: Path, **extra) -> list[str]:
    """Overrides that shrink any experiment to a seconds-long CPU run."""
    o = {
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.head_dim": 16,
        "model.n_kv_heads": 1,
        "model.rope_dim": 8,
        "model.ffn_hidden": 64,
        "model.max_seq_len": 64,
        "data.corpus": str(corpus),
        "data.tokenizer.kind": "byte",
        "data.seq_len": 32,
        "data.batch_size": 4,
        "train.max_steps": 6,
        "train.warmup_steps": 2,
        "train.val_every": 3,
        "train.val_batches": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "output.dir": str(out),
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture
def tiny(corpus, tmp_path):
    """tiny(**overrides) -> a loaded config of experiments/vanilla.yaml at a tiny shape."""

    def build(experiment: str = "experiments/vanilla.yaml", **extra):
        return config.load(ROOT / experiment, tiny_overrides(corpus, tmp_path / "runs", **extra))

    return build


@pytest.fixture(scope="session")
def tiny_model_cfg():
    """tiny_model_cfg(**model_fields) -> config object with a small model and a fixed vocab."""

    def build(components: dict | None = None, **model):
        over = {
            "model.vocab_size": 97,
            "model.d_model": 32,
            "model.n_layers": 2,
            "model.n_heads": 4,
            "model.head_dim": 8,
            "model.n_kv_heads": 1,
            "model.rope_dim": 4,
            "model.ffn_hidden": 48,
            "model.max_seq_len": 32,
            "data.seq_len": 16,
            "plugins": "[tests.plugins.dummy]",
        }
        over.update({f"model.{k}": v for k, v in model.items()})
        for name, fields in (components or {}).items():
            over.update({f"components.{name}.{k}": v for k, v in fields.items()})
        return config.load(ROOT / "experiments/vanilla.yaml", [f"{k}={v}" for k, v in over.items()])

    return build
