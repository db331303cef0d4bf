"""Summary tables of a grid: its runs (one row each, from grid.json, results.jsonl and each run's
metrics.json), their curves, and one row per variant with its paired statistics and verdict.
Grids over settings (probe suites) are also summarised per task and pooled over settings.

The notebooks read grids through this module (and `plots`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from escarda_lab.errors import DataError
from escarda_lab.io import read_json
from escarda_lab.records import METRICS, eval_columns, run_row
from escarda_lab.stats import holm, paired, verdict, welch_p


def load_plan(grid_dir: str | Path) -> dict:
    grid_dir = Path(grid_dir)
    plan = read_json(grid_dir / "grid.json")
    if plan is None:
        raise DataError(
            str(grid_dir),
            None,
            "no grid.json here: this folder is not a grid",
            "pass the folder a grid wrote, e.g. runs/leave_one_out (run the grid YAML first)",
        )
    return plan


def load_runs(grid_dir: str | Path) -> pd.DataFrame:
    """One row per run of the plan; metrics.json (the run's own record) wins over results.jsonl."""
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    recorded = {}
    if (grid_dir / "results.jsonl").exists():
        for line in (grid_dir / "results.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recorded[(r["variant"], r["seed"])] = r
    rows = []
    tuned = plan.get("tuned") or {}
    for v in plan["variants"]:
        choice = (tuned.get(v.get("tune_as") or v["name"]) or {}).get("value")
        for seed in plan["seeds"]:
            rec = dict(recorded.get((v["name"], seed), {}))
            m = read_json(grid_dir / v["name"] / f"seed{seed}" / "metrics.json") or {}
            rec.update({k: m[k] for k in m if k not in ("stats",)})
            rec.update(eval_columns(read_json(grid_dir / v["name"] / f"seed{seed}" / "eval.json") or {}))
            rows.append(
                {
                    **run_row(rec, v["name"], seed, v["baseline"], v["change"], v["kind"]),
                    "tuned": math.nan if choice is None else choice,
                    "adjust": json.dumps(v.get("adjust") or {}) if v.get("adjust") else "",
                    **{k: x for k, x in rec.items() if k.startswith("eval/")},
                }
            )
    return pd.DataFrame(rows)


def curves(grid_dir: str | Path, prefix: str = "val/bpb") -> pd.DataFrame:
    """TensorBoard scalars whose tag starts with `prefix`, as rows (variant, seed, tag, step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    rows = []
    for v in plan["variants"]:
        for seed in plan["seeds"]:
            folder = grid_dir / v["name"] / f"seed{seed}"
            for events in sorted(folder.glob("events.out.tfevents.*")):
                acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
                acc.Reload()
                for tag in acc.Tags()["scalars"]:
                    if tag.startswith(prefix):
                        rows += [(v["name"], seed, tag, e.step, e.value) for e in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["variant", "seed", "tag", "step", "value"])
    return df.drop_duplicates(["variant", "seed", "tag", "step"], keep="last")


def summarize(runs: pd.DataFrame, alpha: float = 0.05, margin: float = 0.01, metric: str = "val_bpb") -> pd.DataFrame:
    """One row per variant (in plan order): mean ± std, paired statistics of `metric` (val_bpb,
    val_loss or val_acc) vs the baseline, Holm across the grid's variants, instability counts and
    the verdict. `delta` is the paired mean difference of `metric`; `delta_bpb` always that of bpb."""
    out = []
    ok = runs[runs.status == "finished"]
    for name, group in runs.groupby("variant", sort=False):
        g = ok[ok.variant == name]
        base_name = group.baseline.iloc[0]
        base = ok[ok.variant == base_name]
        row = {
            "variant": name,
            "change": group.change.iloc[0],
            "kind": group.kind.iloc[0],
            "baseline": base_name,
            "tuned": _first(group.tuned) if "tuned" in group else math.nan,
            "planned": len(group),
            "seeds": len(g),
            "failed": int((group.status != "finished").sum()),
            "diverged": int((group.status == "diverged").sum()),
            "spiky": int((group.grad_spikes > 0).sum()),
            "params_total": _first(group.params_total),
            "params_active": _first(group.params_active),
            "flops_per_token": _first(group.flops_per_token),
            "tokens_per_s": _mean(g.tokens_per_s),
            "val_loss_mean": _mean(g.val_loss),
            "val_loss_std": _std(g.val_loss),
            "val_bpb_mean": _mean(g.val_bpb),
            "val_bpb_std": _std(g.val_bpb),
            "val_acc_mean": _mean(g.val_acc),
            "val_acc_std": _std(g.val_acc),
            "metric": metric,
            "metric_mean": _mean(g[metric]),
            "metric_std": _std(g[metric]),
            "dead": ", ".join(sorted({d for ds in group.dead for d in ds.split(", ") if d})),
        }
        for col in [c for c in runs.columns if c.startswith("eval/")]:
            row[f"{col} mean"], row[f"{col} std"] = _mean(g[col]), _std(g[col])
        if name == base_name:
            row.update(
                {**paired([]), "n_pairs": math.nan, "pair_r": math.nan},
                delta_bpb=0.0,
                delta=0.0,
                p_welch=math.nan,
                speed_vs_baseline=1.0,
            )
        else:
            both = (
                g.set_index("seed")[metric]
                .to_frame("v")
                .join(base.set_index("seed")[metric].to_frame("b"), how="inner")
            )
            st = paired((both.v - both.b).to_numpy(), alpha, margin)
            bpb = (g.set_index("seed").val_bpb - base.set_index("seed").val_bpb).dropna()
            row.update(
                st,
                delta_bpb=float(bpb.mean()) if len(bpb) else math.nan,
                p_welch=welch_p(g[metric], base[metric]),
                pair_r=float(np.corrcoef(both.v, both.b)[0, 1]) if len(both) > 2 else math.nan,
                speed_vs_baseline=row["tokens_per_s"] / _mean(base.tokens_per_s),
            )
        out.append(row)
    summary = pd.DataFrame(out)
    tested = summary.variant != summary.baseline
    summary["p_holm"] = math.nan
    summary.loc[tested, "p_holm"] = holm(summary.loc[tested, "p_paired"].tolist())
    verdicts = []
    for r in summary.to_dict("records"):
        if r["variant"] == r["baseline"]:
            verdicts.append("baseline")
            continue
        v = verdict(r["kind"], r, alpha, margin, METRICS[metric].higher_is_better)
        if r["n_pairs"] >= 2 and r["n_pairs"] < r["planned"]:
            v += f" [{int(r['n_pairs'])}/{r['planned']} seeds]"
        verdicts.append(v)
    summary["verdict"] = verdicts
    return summary


def calibration(summary: pd.DataFrame) -> str | None:
    """Whether the grid's controls came out as they must; None without controls."""
    by = {r.variant.split("-")[0] if r.variant.startswith("control_") else r.variant: r for r in summary.itertuples()}
    null, pos = by.get("control_null"), by.get("control_half_budget")
    if null is None and pos is None:
        return None
    parts, ok = [], True
    if null is not None:
        bad = null.verdict.startswith(("helps", "hurts"))
        ok &= not bad
        parts.append(
            f"the null control (independent seeds) reads **{null.verdict}**"
            + (" — a false positive: treat every verdict here with suspicion" if bad else ", as it must")
        )
    if pos is not None:
        found = pos.verdict.startswith("hurts")
        ok &= found
        parts.append(
            f"the positive control (half the training tokens, Δ {pos.delta:+.4f} {METRICS[pos.metric].label}) reads "
            f"**{pos.verdict}**"
            + (", as it must" if found else " — the grid cannot see an effect of that size: it is UNDERPOWERED")
        )
    head = "**Calibrated.**" if ok else "**NOT CALIBRATED.**"
    return f"{head} " + "; ".join(parts) + "."


def _mean(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.mean()) if len(x) else math.nan


def _std(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _first(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.iloc[0]) if len(x) else math.nan


def compare_folders(
    paths: list[str], alpha: float = 0.05, margin: float = 0.01, metric: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """Any run folders, outside a grid: `runs/a` (every seed<k>/ in it) or `runs/a/seed0`; the
    first name is the baseline; runs of two names pair on their common seeds."""
    rows, names = [], []
    for raw in paths:
        path = Path(raw)
        runs = [path] if (path / "metrics.json").exists() else sorted(path.glob("seed*/"))
        runs = [r for r in runs if (r / "metrics.json").exists()]
        if not runs:
            raise DataError(raw, None, "no finished run here (no metrics.json)", "pass run folders or grid folders")
        name = path.parent.name if path.name.startswith("seed") else path.name
        if name not in names:
            names.append(name)
        for r in runs:
            m = read_json(r / "metrics.json") or {}
            rows.append(run_row(m, name, m.get("seed", 0), "", str(r), "changed"))
    df = pd.DataFrame(rows)
    df["baseline"] = names[0]
    df.loc[df.variant == names[0], "kind"] = "base"
    if metric is None:
        metric = "val_acc" if df.val_bpb.isna().all() or _is_probe(paths[0]) else "val_bpb"
    plan = {
        "baseline": names[0],
        "seeds": sorted(df.seed.unique().tolist()),
        "title": f"# Runs compared: {', '.join(f'`{n}`' for n in names)}",
    }
    return summarize(df, alpha, margin, metric), plan


def _is_probe(path: str) -> bool:
    """Whether a run folder (or a folder of seeds) trained on a probe task."""
    path = Path(path)
    cfg = (
        path / "config.yaml"
        if (path / "config.yaml").exists()
        else next(iter(sorted(path.glob("seed*/config.yaml"))), None)
    )
    import re

    return cfg is not None and re.search(r"corpus:\s*['\"]?probe:", cfg.read_text()) is not None


def by_setting(runs: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """`runs` with each run's variant family (the name before the setting tag), setting, the
    task (a setting's data.corpus) and the family's baseline."""
    info = {v["name"]: v for v in plan["variants"]}
    settings = plan.get("settings") or {}
    out = runs.copy()
    out["family"] = [info[n].get("family", n) for n in out.variant]
    out["setting"] = [info[n].get("setting", "") for n in out.variant]
    corpus = {k: str(flat_get(b, "data.corpus") or k) for k, b in settings.items()}
    out["task"] = [corpus.get(s_, s_).removeprefix("probe:") for s_ in out.setting]
    return out


def flat_get(bundle: dict, dotted: str):
    """A dotted key from a settings bundle written either flat or nested."""
    if dotted in bundle:
        return bundle[dotted]
    node = bundle
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def summarize_settings(
    runs: pd.DataFrame, plan: dict, alpha: float = 0.05, margin: float = 0.01, metric: str = "val_acc"
) -> pd.DataFrame:
    """One row per (variant family, task) and per family over every setting ("all"): the paired
    statistics of `metric` with the baseline family, the pairs being (setting, seed) — each setting
    is a block both arms ran on the same data — with Holm across the families' pooled rows."""
    df = by_setting(runs, plan)
    ok = df[df.status == "finished"]
    base_family = plan["baseline"]
    base = ok[ok.family == base_family].set_index(["setting", "seed"])[metric]
    higher = METRICS[metric].higher_is_better
    kinds = {v.get("family", v["name"]): v["kind"] for v in plan["variants"]}
    rows = []
    for family in [f for f in dict.fromkeys(df.family) if f != base_family]:
        mine = ok[ok.family == family]
        for task in [*dict.fromkeys(mine.task), "all"]:
            g = mine if task == "all" else mine[mine.task == task]
            d = (g.set_index(["setting", "seed"])[metric] - base).dropna()
            st = paired(d.to_numpy(), alpha, margin)
            rows.append({"family": family, "kind": kinds.get(family, ""), "task": task, **st})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p_holm"] = math.nan
    pooled = out.task == "all"
    out.loc[pooled, "p_holm"] = holm(out.loc[pooled, "p_paired"].tolist())
    for task in out.task.unique():  # per task: Holm across the families on that task
        sel = out.task == task
        if task != "all":
            out.loc[sel, "p_holm"] = holm(out.loc[sel, "p_paired"].tolist())
    out["verdict"] = [verdict(r["kind"], r, alpha, margin, higher) for r in out.to_dict("records")]
    return out


SOLVED = 0.9  # a probe counts as solved at this accuracy


def steps_to_solve(curve: pd.DataFrame, df: pd.DataFrame, threshold: float = SOLVED) -> pd.DataFrame:
    """Per run: the first validation step whose accuracy reaches `threshold` (the run's last step
    when only its final whole-test-set score did; NaN if never), and the final accuracy; with its
    family and setting."""
    info = df.set_index(["variant", "seed"])[["family", "setting", "val_acc", "status"]]
    rows = []
    for (variant, seed), g in curve[curve.tag == "val/acc"].groupby(["variant", "seed"], sort=False):
        if (variant, seed) not in info.index:
            continue
        g = g.sort_values("step")
        hit = g[g.value >= threshold]
        r = info.loc[(variant, seed)]
        rows.append(
            {
                "family": r.family,
                "setting": r.setting,
                "seed": seed,
                "step": float(hit.step.iloc[0])
                if len(hit)
                else (float(g.step.max()) if r.val_acc >= threshold else math.nan),
                "final_acc": r.val_acc,
            }
        )
    return pd.DataFrame(rows, columns=["family", "setting", "seed", "step", "final_acc"])
