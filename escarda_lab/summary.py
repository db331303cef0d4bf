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

from escarda_lab import suites
from escarda_lab.conditions import noisy_counts
from escarda_lab.errors import DataError
from escarda_lab.io import read_json, read_jsonl
from escarda_lab.records import METRICS, run_row
from escarda_lab.stats import Plan, holm, paired, verdict, welch_p


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
        for r in read_jsonl(grid_dir / "results.jsonl"):
            if "variant" in r and "seed" in r:
                recorded[(r["variant"], r["seed"])] = r
    rows = []
    tuned = plan.get("tuned") or {}
    for v in plan["variants"]:
        choice = (tuned.get(v.get("tune_as") or v["name"]) or {}).get("value")
        for seed in plan["seeds"]:
            rec = dict(recorded.get((v["name"], seed), {}))
            m = read_json(grid_dir / v["name"] / f"seed{seed}" / "metrics.json") or {}
            rec.update({k: m[k] for k in m if k not in ("stats",)})
            rec.update(suites.columns(read_json(grid_dir / v["name"] / f"seed{seed}" / "eval.json") or {}))
            rows.append(
                {
                    **run_row(rec, v["name"], seed, v["baseline"], v["change"], v["kind"]),
                    "tuned": math.nan if choice is None else choice,
                    "twin_of": v.get("twin_of", ""),
                    "adjust": json.dumps(v.get("adjust") or {}) if v.get("adjust") else "",
                    **{k: x for k, x in rec.items() if k.startswith("eval/")},
                }
            )
    return pd.DataFrame(rows)


def curves(grid_dir: str | Path, prefix: str = "val/bpb") -> pd.DataFrame:
    """TensorBoard scalars of a grid's runs whose tag starts with `prefix`, as rows (variant, seed,
    tag, step, value)."""
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    folders = [(v["name"], s, grid_dir / v["name"] / f"seed{s}") for v in plan["variants"] for s in plan["seeds"]]
    return curves_of(folders, prefix)


def curves_of(folders, prefix: str = "val/bpb") -> pd.DataFrame:
    """The same from (variant, seed, run folder) triples: any runs, in or out of a grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for name, seed, folder in folders:
        for events in sorted(Path(folder).glob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                if tag.startswith(prefix):
                    rows += [(name, seed, tag, e.step, e.value) for e in acc.Scalars(tag)]
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
            "twin_of": group.twin_of.iloc[0] if "twin_of" in group else "",
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
            "ckpt_sd": _mean(g.ckpt_sd) if "ckpt_sd" in g else math.nan,
            "eval_se": _mean(g.eval_se) if "eval_se" in g else math.nan,
            "dead": ", ".join(sorted({d for ds in group.dead for d in ds.split(", ") if d})),
        }
        row["speed_timed"], row["speed_noisy"], row["speed_why"] = noisy_counts(
            g.conditions if "conditions" in g else []
        )
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
                eval_se_paired=paired_eval_se(g, base),
                delta_bpb=float(bpb.mean()) if len(bpb) else math.nan,
                p_welch=welch_p(g[metric], base[metric]),
                pair_r=float(np.corrcoef(both.v, both.b)[0, 1]) if len(both) > 2 else math.nan,
                speed_vs_baseline=row["tokens_per_s"] / _mean(base.tokens_per_s),
            )
        out.append(row)
    summary = pd.DataFrame(out)
    adjust(summary)
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


OUTSIDE_FAMILY = ("control", "rung")  # calibration controls and ladder budgets test no hypothesis


def in_family(summary: pd.DataFrame) -> pd.Series:
    """The comparisons that are the grid's hypotheses, each variant at its own (tuned) recipe:
    not the baseline, the controls, the budgets, or the same-recipe twins (their own family)."""
    twin = summary.twin_of.astype(bool) if "twin_of" in summary else False
    return (summary.variant != summary.baseline) & ~summary.kind.isin(OUTSIDE_FAMILY) & ~twin


def same_recipe_family(summary: pd.DataFrame) -> pd.Series:
    """The second reading's comparisons: every variant at the baseline's tuned value, i.e. its
    `@base_` twin, or the variant itself where its own value is the baseline's."""
    if "twin_of" not in summary or not summary.twin_of.astype(bool).any():
        return pd.Series(False, index=summary.index)
    twins = summary.twin_of.astype(bool)
    base_value = summary.loc[summary.variant == summary.baseline, "tuned"]
    equal = summary.tuned == (base_value.iloc[0] if len(base_value) else math.nan)
    return twins | (in_family(summary) & ~summary.variant.isin(summary.twin_of) & equal)


def adjust(summary: pd.DataFrame) -> None:
    """Family-adjusted p-values, in place. `p_holm` / `p_tost_holm`: Holm within the family (the
    variants at their own recipe; the same-recipe twins within theirs). `p_holm_same` /
    `p_tost_holm_same`: the same-recipe family, for every member. A comparison outside both (a
    control) is adjusted as the family's strictest member would be, Bonferroni at its size: it is
    "detected" only where any variant with that effect would be."""
    family, same = in_family(summary), same_recipe_family(summary)
    tested = summary.variant != summary.baseline
    m = max(int(family.sum()), 1)
    for col, adj in [("p_paired", "p_holm"), ("p_tost", "p_tost_holm")]:
        summary[adj] = math.nan
        summary[adj + "_same"] = math.nan
        summary.loc[family, adj] = holm(summary.loc[family, col].tolist())
        summary.loc[same, adj + "_same"] = holm(summary.loc[same, col].tolist())
        twins = same & ~family
        summary.loc[twins, adj] = summary.loc[twins, adj + "_same"]
        outside = tested & ~family & ~same
        summary.loc[outside, adj] = np.minimum(1.0, m * summary.loc[outside, col])


def readings(summary: pd.DataFrame, alpha: float, margin: float) -> pd.DataFrame | None:
    """Each variant read twice: at the baseline's tuned value ("same recipe": what the change does
    to this exact recipe) and at its own ("own best": each arm at its best); None without twins."""
    same = same_recipe_family(summary)
    if not same.any():
        return None
    higher = METRICS[summary.metric.iloc[0]].higher_is_better
    rows = []
    for r in summary[in_family(summary)].to_dict("records"):
        twin = summary[same & (summary.twin_of == r["variant"])]
        s = twin.iloc[0].to_dict() if len(twin) else (r if bool(same[summary.variant == r["variant"]].any()) else None)
        entry = {"variant": r["variant"], "own": r, "same": None}
        if s is not None:
            s = {**s, "p_holm": s["p_holm_same"], "p_tost_holm": s["p_tost_holm_same"]}
            entry["same"] = {**s, "verdict": verdict(r["kind"], s, alpha, margin, higher)}
        rows.append(entry)
    return pd.DataFrame(rows)


def paired_eval_se(mine: pd.DataFrame, base: pd.DataFrame) -> float:
    """The evaluation's standard error of a paired difference: per seed, the sd over validation
    batches of (variant − baseline) bpb over √batches (both score the same batches, so what the
    batches share cancels), averaged over seeds. NaN without per-batch scores."""
    if "batch_bpb" not in mine or "batch_bpb" not in base:
        return math.nan
    b = base.set_index("seed").batch_bpb
    out = []
    for seed, v in zip(mine.seed, mine.batch_bpb):
        w = b.get(seed)
        if isinstance(v, list) and isinstance(w, list) and len(v) == len(w) > 1:
            d = np.asarray(v) - np.asarray(w)
            out.append(float(d.std(ddof=1)) / math.sqrt(len(d)))
    return float(np.mean(out)) if out else math.nan


def pooled_sd(summary: pd.DataFrame) -> float:
    """sd of the paired differences pooled over the family (root of the mean variance)."""
    sd = summary.loc[in_family(summary), "sd_diff"].dropna()
    return float(np.sqrt(np.mean(sd**2))) if len(sd) else math.nan


def plan(summary: pd.DataFrame, alpha: float, target: float, margin: float, sd: float | None = None) -> Plan | None:
    """The grid's prospective power (stats.Plan): from `sd` when given (a prior), else pooled."""
    family = summary[in_family(summary)]
    sd = pooled_sd(summary) if sd is None else sd
    n = int(np.nanmedian(family.n_pairs)) if len(family) and family.n_pairs.notna().any() else 0
    if not len(family) or not math.isfinite(sd):
        return None
    return Plan(sd=sd, n=n, family=len(family), alpha=alpha, target=target, margin=margin)


def control_of(variant: str) -> tuple[str, float] | None:
    """("null", 0) or ("budget", fraction of the training tokens) for a calibration control's name
    (`control_null`, `control_null2`, ...; `control_budget0.75`, `control_half_budget`), else None."""
    name = variant.split("-")[0]
    if name.startswith("control_null"):
        return "null", 0.0
    if name == "control_half_budget":
        return "budget", 0.5
    if name.startswith("control_budget"):
        return "budget", float(name.removeprefix("control_budget"))
    return None


def rung_budget(r) -> tuple[str, float] | None:
    """A ladder rung of the baseline below its own budget (`full-x0.5`) is a positive control too:
    the baseline with fewer training tokens."""
    if r.kind != "rung" or not r.variant.startswith(f"{r.baseline}-x"):
        return None
    try:
        t = float(r.variant.removeprefix(f"{r.baseline}-x"))
    except ValueError:
        return None
    return ("budget", t) if t < 1 else None


def calibration(summary: pd.DataFrame, alpha: float = 0.05) -> str | None:
    """The grid's controls, measured: how many null controls (the baseline against itself with
    independent seeds) read a difference, and which positive controls (the baseline with fewer
    training tokens: a known, graded harm) the grid detected. None without controls."""
    rows = [(control_of(r.variant) or rung_budget(r), r) for r in summary.itertuples() if r.variant != r.baseline]
    nulls = [r for c, r in rows if c and c[0] == "null"]
    budgets = sorted(((c[1], r) for c, r in rows if c and c[0] == "budget"), key=lambda x: x[0])
    if not nulls and not budgets:
        return (
            "**Calibration:** none measured here: the grid has no null controls (the baseline against "
            "itself on other seeds) and no positive controls (the baseline with fewer tokens), so its "
            "error rates rest on the procedure's simulation (tests/test_verdict_simulation.py), not on "
            "this grid's runs (`grid.calibration: {nulls, budgets}` adds them)."
        )
    unit = METRICS[summary.metric.iloc[0]].label
    m = int(in_family(summary).sum())
    judged = f"as the strictest of the {m} comparisons would be" if m else f"at alpha {alpha:g}: no variant comparisons"
    lines = [f"**Calibration, measured** (each control is judged {judged})."]
    if nulls:
        fp = [r for r in nulls if r.verdict.startswith(("helps", "hurts"))]
        raw = sum(r.p_paired < alpha for r in nulls)
        exclude = sum(r.ci_low > 0 or r.ci_high < 0 for r in nulls)
        lines.append(
            f"- Null controls: **{len(fp)} of {len(nulls)}** read helps/hurts (false positives); "
            f"{raw} of {len(nulls)} have p < {alpha:g} before adjustment and {exclude} a 95% interval excluding 0 "
            f"(each expected with probability {alpha:g}). Their Δ: "
            + ", ".join(f"{r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]" for r in nulls)
            + (". A false positive here means: treat every verdict with suspicion." if fp else ".")
        )
    if budgets:
        found = [(f, r) for f, r in budgets if r.verdict.startswith("hurts")]
        lines.append(
            "- Positive controls (fewer training tokens), Δ with adjusted p: "
            + "; ".join(
                f"{f:g}× tokens Δ {r.delta:+.4f} {unit} (p_adj {r.p_holm:.3g}, "
                f"{'detected' if r.verdict.startswith('hurts') else 'not detected'})"
                for f, r in budgets
            )
            + ". "
            + (
                f"Smallest harm detected: **{min(abs(r.delta) for _, r in found):.4f} {unit}** "
                f"({max(f for f, _ in found):g}× tokens)."
                if found
                else "**None detected: the grid is UNDERPOWERED for harms of these sizes.**"
            )
        )
    return "\n".join(lines)


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
) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Any run folders, outside a grid: `runs/a` (every seed<k>/ in it) or `runs/a/seed0`; the
    first name is the baseline; runs of two names pair on their common seeds. Returns the verdict
    table, the plan (with each run's folder) and the runs."""
    rows, names, folders = [], [], []
    # a run's name is its variant folder's; two folders of one name from different grids (the
    # same variant under two recipes) are told apart by the grid folder above them
    variant_dirs = {raw: (Path(raw).parent if Path(raw).name.startswith("seed") else Path(raw)) for raw in paths}
    owners: dict[str, set] = {}
    for d in variant_dirs.values():
        owners.setdefault(d.name, set()).add(d.resolve())
    for raw in paths:
        path = Path(raw)
        runs = [path] if (path / "metrics.json").exists() else sorted(path.glob("seed*/"))
        runs = [r for r in runs if (r / "metrics.json").exists()]
        if not runs:
            raise DataError(raw, None, "no finished run here (no metrics.json)", "pass run folders or grid folders")
        d = variant_dirs[raw]
        name = d.name if len(owners[d.name]) == 1 else f"{d.parent.name}/{d.name}"
        if name not in names:
            names.append(name)
        for r in runs:
            m = read_json(r / "metrics.json") or {}
            rows.append(run_row(m, name, m.get("seed", 0), "", str(r), "changed"))
            folders.append((name, m.get("seed", 0), str(r)))
    df = pd.DataFrame(rows)
    df["baseline"] = names[0]
    df.loc[df.variant == names[0], "kind"] = "base"
    if metric is None:
        metric = "val_acc" if df.val_bpb.isna().all() or _is_probe(paths[0]) else "val_bpb"
    plan = {
        "baseline": names[0],
        "seeds": sorted(df.seed.unique().tolist()),
        "title": f"# Runs compared: {', '.join(f'`{n}`' for n in names)}",
        "folders": folders,
    }
    return summarize(df, alpha, margin, metric), plan, df


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
    for col, adj in [("p_paired", "p_holm"), ("p_tost", "p_tost_holm")]:
        out[adj] = math.nan
        for task in out.task.unique():  # per task, and pooled ("all"): Holm across the families
            sel = out.task == task
            out.loc[sel, adj] = holm(out.loc[sel, col].tolist())
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
