"""Every run in one table, queried without opening folders:

    python -m escarda_lab.results                                   # every run under runs/
    python -m escarda_lab.results "grid = 'leave_one_out' AND status = 'finished'"
    python -m escarda_lab.results "SELECT variant, avg(val_bpb) FROM runs GROUP BY variant"

An index of the runs under a root folder (`runs` by default) in `<root>/results.sqlite`, one row
per run folder: where it is (folder, grid, variant, seed), how it ended (status, step), what it
scored (val_bpb, val_loss, val_acc, ...), what it cost (parameters, FLOPs/token, tokens/s), the
git commit it ran at, and every key of its config.yaml as a column ("model.d_model",
"components.mla.enabled", ...). Its argument is a SELECT or a filter (a WHERE clause).

SQLite rather than DuckDB: it ships with Python (no dependency), and it takes concurrent writers
safely (a run, a grid and compare may refresh the same index at once: each write is one
transaction behind a file lock); DuckDB allows one writing process at a time. The folders stay the
source of truth: the index is rebuilt from them whenever it is refreshed, and a damaged run folder
is skipped with a warning naming it.
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "results")

import json
import logging
import math
import sqlite3
import sys
import time
from pathlib import Path

from escarda_lab.errors import DataError, UserError
from escarda_lab.io import flatten, read_json

log = logging.getLogger("escarda_lab")
INDEX = "results.sqlite"
FIXED = {  # column -> type; the config keys are added as they appear
    "folder": "TEXT PRIMARY KEY",
    "grid": "TEXT",
    "variant": "TEXT",
    "seed": "INTEGER",
    "status": "TEXT",
    "step": "INTEGER",
    "val_bpb": "REAL",
    "val_loss": "REAL",
    "val_acc": "REAL",
    "val_bpb_se": "REAL",
    "val_bpb_avg": "REAL",
    "val_bpb_ema": "REAL",
    "params_total": "INTEGER",
    "params_active": "INTEGER",
    "flops_per_token": "REAL",
    "tokens_per_s": "REAL",
    "train_tokens": "INTEGER",
    "train_seconds": "REAL",
    "git_commit": "TEXT",
    "error": "TEXT",
    "indexed_at": "REAL",
}
SHOWN = ["grid", "variant", "seed", "status", "step", "val_bpb", "val_loss", "val_acc", "params_total", "git_commit"]


def root_of(run_folder: Path) -> Path:
    """The index a run belongs to: <root>/<name>/seed<k>, or <root>/<grid>/<variant>/seed<k>."""
    parent = run_folder.parent.parent
    return parent.parent if (parent / "grid.json").exists() else parent


def row_of(folder: Path, root: Path) -> dict | None:
    """A run folder's row; None (with a warning) when its files are damaged."""
    import yaml

    m = read_json(folder / "metrics.json")  # warns itself when damaged
    if m is None:
        return None
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"holds a {type(cfg).__name__}, not a mapping")
    except FileNotFoundError:
        cfg = {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s is damaged (%s): its run is left out of the index", folder / "config.yaml", e)
        return None
    rel = folder.relative_to(root)
    grid = rel.parts[0] if len(rel.parts) == 3 else ""
    params = m.get("params") if isinstance(m.get("params"), dict) else {}
    row = {k: m.get(k) for k in FIXED if k in m and not isinstance(m.get(k), (dict, list))}
    row.update(
        folder=str(rel),
        grid=grid,
        variant=rel.parts[-2],
        seed=m.get("seed", cfg.get("seed")),
        params_total=params.get("total"),
        params_active=params.get("active"),
        indexed_at=time.time(),
    )
    row.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(cfg).items() if k not in FIXED})
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def connect(root: Path) -> sqlite3.Connection:
    con = sqlite3.connect(root / INDEX, timeout=60, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 60000")
    return con


def _write(con: sqlite3.Connection, rows: list[dict], prune_under: str | None) -> None:
    """One transaction: add missing columns, upsert the rows, and (with `prune_under`, a folder
    prefix; "" for all) drop the rows of folders under it that were not found again."""
    con.execute("BEGIN IMMEDIATE")  # takes the write lock now: a second writer waits, never interleaves
    try:
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{q(c)} {t}' for c, t in FIXED.items())})")
        have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        for col in dict.fromkeys(k for r in rows for k in r):
            if col not in have:
                con.execute(f"ALTER TABLE runs ADD COLUMN {q(col)}")
                have.add(col)
        for r in rows:
            cols = list(r)
            con.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(map(q, cols))}) VALUES ({', '.join('?' * len(cols))})",
                [r[c] for c in cols],
            )
        if prune_under is not None:
            kept = {r["folder"] for r in rows}
            for (folder,) in con.execute("SELECT folder FROM runs").fetchall():
                if folder not in kept and (not prune_under or folder.startswith(prune_under + "/")):
                    con.execute("DELETE FROM runs WHERE folder = ?", (folder,))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def refresh(root: str | Path, under: str | Path | None = None) -> int:
    """Re-read the run folders under `root` (or only under its sub-folder `under`) into the index;
    returns the number of runs indexed. Folders that disappeared leave the index."""
    root = Path(root)
    scope = root if under is None else Path(under)
    if not root.is_dir():
        raise DataError(str(root), None, "no such folder", "pass the folder your runs are in (output.dir, e.g. runs)")
    rows = []
    for metrics in sorted(scope.rglob("metrics.json")):
        folder = metrics.parent
        if not folder.name.startswith("seed") or len(folder.relative_to(root).parts) not in (2, 3):
            continue
        row = row_of(folder, root)
        if row is not None:
            rows.append(row)
    try:
        con = connect(root)
        try:
            _write(con, rows, "" if scope == root else str(scope.relative_to(root)))
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise DataError(
            str(root / INDEX),
            None,
            f"the results index is not readable ({e})",
            "delete it: the next refresh rebuilds it",
        ) from None
    return len(rows)


def index_run(folder: str | Path) -> None:
    """After a run writes metrics.json: its row in its root's index. Never fails the run: an index
    that cannot be written is a warning (the folder is the record; the next refresh catches up)."""
    folder = Path(folder)
    root = root_of(folder)
    try:
        row = row_of(folder, root)
        if row is not None:
            con = connect(root)
            try:
                _write(con, [row], None)
            finally:
                con.close()
    except (sqlite3.Error, OSError) as e:
        log.warning(
            "the results index %s was not updated (%s): `python -m escarda_lab.results` rebuilds it", root / INDEX, e
        )


def query(sql_or_filter: str = "", root: str | Path = "runs", refreshed: bool = True):
    """A DataFrame: a SELECT as written, or the main columns of the runs a filter (WHERE clause) keeps."""
    import pandas as pd

    root = Path(root)
    if refreshed:
        refresh(root)
    text = sql_or_filter.strip()
    if not text:
        sql = f"SELECT {', '.join(SHOWN)} FROM runs ORDER BY grid, variant, seed"
    elif text.split(None, 1)[0].upper() in ("SELECT", "WITH"):
        sql = text
    else:
        sql = f"SELECT {', '.join(SHOWN)} FROM runs WHERE {text} ORDER BY grid, variant, seed"
    con = sqlite3.connect(f"file:{root / INDEX}?mode=ro", uri=True, timeout=60)
    try:
        return pd.read_sql_query(sql, con)
    except (sqlite3.Error, pd.errors.DatabaseError) as e:
        raise UserError(
            "command line",
            "query",
            f"the query failed: {e} (SQL: {sql})",
            "write a filter such as \"status = 'finished'\" or a SELECT over the table `runs`; config keys are "
            'quoted column names, e.g. "model.d_model"',
        ) from None
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    from escarda_lab import cli

    args = arguments.parser("results").parse_args(argv)

    def body() -> None:
        import pandas as pd

        df = query(args.query, args.root, refreshed=not args.no_refresh)
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            print(df.to_string(index=False) if len(df) else "no runs match")
        print(f"({len(df)} rows; index {Path(args.root) / INDEX})", file=sys.stderr)

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
