"""The benchmark command: Lightning vs a plain loop, variant ratios, cached decoding, in one run."""

from __future__ import annotations

import json

from escarda_lab.bench import main, steady_seconds_per_step
from tests.conftest import ROOT, tiny_overrides


def test_steady_time_skips_warmup_steps():
    assert steady_seconds_per_step([0.0, 5.0, 6.0, 7.0, 8.0], warmup=1) == 1.0


def test_bench_prints_loops_variants_and_decode(corpus, tmp_path, capsys):
    code = main(["experiments/vanilla.yaml", "experiments/escarda.yaml", *tiny_overrides(corpus, tmp_path),
                 "--steps", "8", "--rounds", "1", "--warmup", "2", "--decode", "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["name"] for v in res["loop_overhead"]] == ["plain", "lightning"] and res["peak_flops"] > 1e9
    assert [v["name"] for v in res["variants"]] == ["vanilla", "escarda"]
    base, esc = res["variants"]
    assert base["ratio_to_baseline"] == 1.0 and esc["ratio_to_baseline"] > 0
    for v in res["variants"]:
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 1 and v["decode_tokens_per_s"] > 0
        assert v["cache_numbers_per_token"] == 2 * 2 * 1 * 16  # 2 layers x (K, V) x 1 head x 16 dims


def test_bench_refuses_too_few_steps(capsys):
    assert main([str(ROOT / "experiments/vanilla.yaml"), "--steps", "3", "--warmup", "5"]) == 2
    assert "--steps" in capsys.readouterr().err
