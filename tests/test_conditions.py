"""A speed travels with the conditions it was measured under (escarda_lab.conditions)."""

import pandas as pd

from escarda_lab import report
from escarda_lab.conditions import RUNS_AT_ONCE, measure, noisy_counts, speed_note, why_noisy

QUIET = {"load": 0.2, "load_end": 0.9, "cpus": 2, "runs_at_once": 1, "device": "cpu"}


def test_a_run_alone_on_a_quiet_machine_is_not_noisy():
    assert why_noisy(QUIET) == ""


def test_parallel_runs_on_cpu_share_the_cores():
    assert "2 runs shared 2 cores" in why_noisy({**QUIET, "runs_at_once": 2})


def test_parallel_runs_on_separate_gpus_are_not_flagged_for_sharing():
    assert why_noisy({**QUIET, "runs_at_once": 2, "device": "cuda"}) == ""


def test_a_busy_machine_before_the_run_is_noisy():
    assert "load 3.0 on 2 cores" in why_noisy({**QUIET, "load": 3.0})


def test_the_load_a_measurement_puts_there_itself_is_not_other_work():
    alone = {**QUIET, "load": 0.0, "load_end": 2.0, "threads": 2}  # one process computing on both cores
    assert why_noisy(alone) == ""
    assert "load 3.5 on 2 cores" in why_noisy({**alone, "load": 3.5})  # more than itself: other work ran


def test_a_measurement_records_its_threads():
    assert measure("cpu", threads=2)["threads"] == 2 and "threads" not in measure("cpu")


def test_fewer_than_three_benchmark_rounds_are_noisy():
    assert why_noisy(QUIET, rounds=1) == "1 round (< 3)" and why_noisy(QUIET, rounds=3) == ""


def test_a_grid_tells_its_children_how_many_runs_share_the_machine(monkeypatch):
    monkeypatch.setenv(RUNS_AT_ONCE, "3")
    assert measure("cpu")["runs_at_once"] == 3


def test_the_speed_note_counts_the_noisy_runs_and_says_why():
    timed, noisy, why = noisy_counts([QUIET, {**QUIET, "runs_at_once": 2}, None])
    assert (timed, noisy) == (2, 1)
    assert "1 of 2 runs" in speed_note(timed, noisy, why) and "2 runs shared 2 cores" in speed_note(timed, noisy, why)
    assert "to themselves" in speed_note(2, 0, "") and "no run recorded" in speed_note(0, 0, "")


def test_the_verdict_table_says_when_its_speeds_are_noisy():
    table = pd.DataFrame({"speed_timed": [2, 2], "speed_noisy": [2, 0], "speed_why": ["2 runs shared 2 cores", ""]})
    assert "**noisy**: 2 of 4 runs" in report.speed_line(table)
