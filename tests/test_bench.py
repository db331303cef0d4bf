"""The benchmark command: Lightning vs a plain loop, variant ratios, cached decoding, in one run."""

from __future__ import annotations

import json

import pytest

from escarda_lab.bench import main, steady_seconds_per_step
from tests.conftest import ROOT, tiny_overrides


def test_steady_time_skips_warmup_steps():
    assert steady_seconds_per_step([0.0, 5.0, 6.0, 7.0, 8.0], warmup=1) == 1.0


def test_bench_prints_loops_variants_and_decode(corpus, tmp_path, capsys):
    code = main(
        [
            "experiments/vanilla.yaml",
            "experiments/escarda.yaml",
            *tiny_overrides(corpus, tmp_path),
            "--steps",
            "8",
            "--rounds",
            "1",
            "--warmup",
            "2",
            "--decode",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("NOISY: 1 round (< 3)")  # one round is never a measurement to quote
    res = json.loads(out[-1])
    assert res["rounds"] == 1 and res["conditions"]["cpus"] >= 1
    assert [v["name"] for v in res["loop_overhead"]] == ["pytorch", "lightning"] and res["peak_flops"] > 1e9
    assert 0 <= res["data_wait_fraction"] < 1
    assert [v["name"] for v in res["variants"]] == ["vanilla", "escarda"]
    base, esc = res["variants"]
    assert base["ratio_to_baseline"] == 1.0 and esc["ratio_to_baseline"] > 0
    for v in res["variants"]:
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 1 and v["decode_tokens_per_s"] > 0
        assert v["cache_numbers_per_token"] == 2 * 2 * 1 * 16  # 2 layers x (K, V) x 1 head x 16 dims


FIELDS = {
    "name",
    "tokens_per_s",
    "ms_per_step",
    "flops_per_token",
    "mfu",
    "ratio_to_baseline",
    "decode_tokens_per_s",
    "peak_mem_bytes",
}


def test_single_experiment_is_compared_with_its_vanilla_shape(corpus, tmp_path, capsys):
    code = main(
        [
            "experiments/no_engram.yaml",
            *tiny_overrides(corpus, tmp_path),
            "--steps",
            "5",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    names = [v["name"] for v in res["variants"]]
    assert names[:2] == ["vanilla", "no_engram"] and "vanilla+engram" not in names
    assert {"vanilla+mtp", "vanilla+hyper_connections", "vanilla+jepa"} <= set(names)
    for v in res["variants"]:
        assert FIELDS <= v.keys() and v["peak_mem_bytes"] > 0
    base, var = res["variants"][:2]
    assert base["flops_per_token_by_plugin"] == {}
    assert {"mla", "hyper_connections", "mtp"} <= var["flops_per_token_by_plugin"].keys()
    assert var["flops_per_token_by_plugin"]["mtp"] > 0  # a second head costs FLOPs
    assert "MFLOP/token added by each plugin" in out
    ratios = res["plugin_ratios"]
    assert {"mtp", "hyper_connections", "jepa", "all"} <= ratios.keys() and "engram" not in ratios
    assert ratios["all"] == var["ratio_to_baseline"] and all(r > 0 for r in ratios.values())
    assert "each plugin alone (vanilla+X)" in out
    assert names[-1] == "vanilla+null" and ratios["null"] == res["variants"][-1]["ratio_to_baseline"]
    assert res["variants"][-1]["flops_per_token"] == base["flops_per_token"] and "noise floor" in out
    t, f, q = res["time_per_flop"]["mtp"]
    mtp = next(v for v in res["variants"] if v["name"] == "vanilla+mtp")
    assert t == ratios["mtp"] and f == pytest.approx(mtp["flops_per_token"] / base["flops_per_token"])
    assert q == pytest.approx(t / f) and "time/FLOP" in out and "null" not in res["time_per_flop"]


def test_grid_file_benchmarks_its_variants_against_its_baseline(corpus, tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"extends: {ROOT / 'experiments/escarda.yaml'}\nname: g\n"
        "grid: {baseline: no_xsa, seeds: [3, 4], leave_one_out: [xsa]}\n"
    )
    assert (
        main([str(grid), *tiny_overrides(corpus, tmp_path), "--steps", "4", "--rounds", "1", "--warmup", "1", "--json"])
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["name"] for v in res["variants"]] == ["no_xsa", "full"]
    assert res["variants"][0]["ratio_to_baseline"] == 1.0


def test_bench_refuses_too_few_steps(capsys):
    assert main([str(ROOT / "experiments/vanilla.yaml"), "--steps", "3", "--warmup", "5"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_head_both_measures_each_variant_fused_and_unfused(corpus, tmp_path, capsys):
    args = ["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path), "--head", "both"]
    assert main([*args, "--steps", "3", "--rounds", "1", "--warmup", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["name"] for v in res["variants"]] == ["vanilla", "vanilla+unfused_head"]
    assert all(v["peak_mem_bytes"] > 0 for v in res["variants"]) and res["plugin_ratios"] == {}
