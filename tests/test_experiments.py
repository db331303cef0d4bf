"""Every shipped experiment file loads, builds, and trains 2 steps at a tiny shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from escarda_lab.io import read_json
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides

EXPERIMENTS = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[str(p.relative_to("experiments").with_suffix("")) for p in EXPERIMENTS])
def test_experiment_trains_two_steps(experiment: Path, corpus, tmp_path):
    over = tiny_overrides(corpus, tmp_path, **{"train.max_steps": 2, "train.warmup_steps": 1,
                                               "train.val_every": 2, "train.checkpoint_every": 2})
    assert main([str(ROOT / experiment), *over]) == 0
    (folder,) = list(tmp_path.glob("*/seed0"))
    assert read_json(folder / "metrics.json")["status"] == "finished"
