"""Every shipped experiment file loads, builds, and trains 2 steps at a tiny shape; every grid
file expands (each of its runs resolved and validated) without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from escarda_lab import config, grid
from escarda_lab.io import read_json
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides

FILES = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments").rglob("*.yaml"))
GRIDS = [p for p in FILES if config.read_grid(ROOT / p) is not None]
EXPERIMENTS = [p for p in FILES if p not in GRIDS]


@pytest.mark.parametrize(
    "experiment", EXPERIMENTS, ids=[str(p.relative_to("experiments").with_suffix("")) for p in EXPERIMENTS]
)
def test_experiment_trains_two_steps(experiment: Path, corpus, tmp_path):
    over = tiny_overrides(
        corpus,
        tmp_path,
        **{"train.max_steps": 2, "train.warmup_steps": 1, "train.val_every": 2, "train.checkpoint_every": 2},
    )
    assert main([str(ROOT / experiment), *over]) == 0
    (folder,) = list(tmp_path.glob("*/seed0"))
    assert read_json(folder / "metrics.json")["status"] == "finished"


@pytest.mark.parametrize("grid_file", GRIDS, ids=[p.stem for p in GRIDS])
def test_grid_file_expands_into_valid_runs(grid_file: Path, corpus, tmp_path):
    g, runs, grid_dir, *_ = grid.resolved(ROOT / grid_file, tiny_overrides(corpus, tmp_path))
    assert len(runs) == len(g.seeds) * len({r.variant.name for r in runs}) > len(g.seeds)
    assert {r.variant.baseline for r in runs} <= {r.variant.name for r in runs}
    assert all(r.folder.parent.parent == grid_dir for r in runs)
