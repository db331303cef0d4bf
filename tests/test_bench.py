"""The benchmark command measures Lightning against a plain loop in one process."""

from __future__ import annotations

import json

from escarda_lab.bench import main, steady_seconds_per_step
from tests.conftest import ROOT, tiny_overrides


def test_steady_time_skips_warmup_steps():
    assert steady_seconds_per_step([0.0, 5.0, 6.0, 7.0, 8.0], warmup=1) == 1.0


def test_bench_prints_both_loops_with_ratios(corpus, tmp_path, capsys):
    code = main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path), "--steps", "8",
                 "--rounds", "1", "--warmup", "2", "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [v["name"] for v in res["variants"]]
    assert names == ["plain", "lightning"] and res["peak_flops"] > 1e9
    for v in res["variants"]:
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 1 and v["ratio_to_plain"] > 0
    assert res["variants"][0]["ratio_to_plain"] == 1.0


def test_bench_refuses_too_few_steps(capsys):
    assert main([str(ROOT / "experiments/vanilla.yaml"), "--steps", "3", "--warmup", "5"]) == 2
    assert "--steps" in capsys.readouterr().err
