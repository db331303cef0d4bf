"""The results index (escarda_lab.results): every run under a folder in one SQLite table."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from escarda_lab import results
from escarda_lab.io import write_json


def fake_run(folder, seed=0, bpb=2.0, status="finished", **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "metrics.json", {"seed": seed, "status": status, "val_bpb": bpb, "params": {"total": 10}})
    lines = [
        f"seed: {seed}",
        "model:",
        f"  d_model: {cfg.get('d_model', 32)}",
        "components:",
        "  mla:",
        "    enabled: true",
    ]
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def root(tmp_path):
    """Two grids of two runs each and one loose run."""
    for grid in ["g1", "g2"]:
        (tmp_path / grid).mkdir()
        (tmp_path / grid / "grid.json").write_text("{}")
        for variant, bpb in [("full", 2.0), ("no_mla", 2.1)]:
            fake_run(tmp_path / grid / variant / "seed0", bpb=bpb)
    fake_run(tmp_path / "alone" / "seed3", seed=3, bpb=1.9, d_model=64)
    return tmp_path


def test_one_table_lists_the_runs_of_two_grids_and_a_loose_run(root):
    df = results.query("", root)
    assert len(df) == 5
    assert set(df.grid) == {"g1", "g2", ""} and set(df.variant) == {"full", "no_mla", "alone"}


def test_config_keys_are_columns_and_a_select_runs_as_written(root):
    df = results.query('SELECT variant, "model.d_model" AS d FROM runs WHERE "components.mla.enabled" = 1', root)
    assert dict(zip(df.variant, df.d))["alone"] == 64 and len(df) == 5


def test_a_filter_keeps_the_matching_runs(root):
    assert results.query("val_bpb > 2.05", root).variant.tolist() == ["no_mla", "no_mla"]


def test_the_cli_prints_the_table(root, capsys):
    assert results.main(["grid = 'g1'", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no_mla" in out and "g2" not in out


def test_a_bad_query_is_one_paragraph_naming_the_table(root, capsys):
    assert results.main(["no_such_column = 1", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no such column" in err and "Traceback" not in err


def test_a_damaged_run_folder_is_skipped_with_a_warning_and_the_rest_indexed(root, caplog):
    (root / "g1" / "full" / "seed0" / "metrics.json").write_bytes(b"\x00\xff{")
    df = results.query("", root)
    assert len(df) == 4 and "metrics.json is damaged" in caplog.text


def test_a_deleted_run_leaves_the_index_on_the_next_refresh(root):
    results.refresh(root)
    import shutil

    shutil.rmtree(root / "g2" / "no_mla")
    assert len(results.query("", root)) == 4


def test_a_grids_refresh_touches_only_its_own_rows(root):
    results.refresh(root)
    fake_run(root / "g1" / "extra" / "seed0")
    results.refresh(root, under=root / "g1")
    assert len(results.query("", root, refreshed=False)) == 6


def _writer(root, start):
    for i in range(start, start + 40):
        fake_run(root / f"v{i}" / "seed0", bpb=float(i), d_model=i)
        results.index_run(root / f"v{i}" / "seed0")


def test_two_writers_at_once_leave_the_index_consistent(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, s)) for s in (0, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    con = sqlite3.connect(tmp_path / results.INDEX)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = con.execute('SELECT val_bpb, "model.d_model" FROM runs').fetchall()
    assert len(rows) == 80 and all(b == d for b, d in rows)  # every row whole: no write interleaved


def test_a_run_indexes_itself_when_it_finishes(corpus, tmp_path):
    from escarda_lab.run import main
    from tests.conftest import tiny_overrides

    assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path)]) == 0
    df = results.query("SELECT * FROM runs", tmp_path, refreshed=False)
    assert len(df) == 1 and df.status[0] == "finished" and df.val_bpb[0] > 0
    assert df["model.d_model"][0] == 32 and "data.tokenizer.kind" in df  # config keys as columns
