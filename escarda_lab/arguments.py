"""Every command line's arguments, in one light module (argparse only), so `--help` answers
before torch is imported. Each CLI module calls `help_if_asked(__name__, "<command>")` first."""

from __future__ import annotations

import argparse
import sys

DESCRIPTIONS = {
    "run": "Train one experiment into runs/<name>/seed<k>/ (a finished run is skipped, an interrupted one "
    "resumes), or every run of a grid file.",
    "compare": "Verdict tables and plots for a grid: paired statistics of each variant against the baseline "
    "(summary.md, summary.csv, curves.png; by_component.md and difficulty.png for grids over settings); "
    "--plan: the seeds a grid needs before it runs.",
    "evaluate": "Score a finished run: its validation split, text files, corpora, the minimal-pairs suite, "
    "multiple-choice tasks and probe tasks; writes <run>/eval.json.",
    "generate": "Sample text from a finished run with the KV cache (ChatML with --chat).",
    "export": "Write a finished run as a Hugging Face folder (safetensors, config, tokenizer with the ChatML "
    "chat template, modeling code).",
    "bench": "Interleaved A/B timing of experiments in one process: training step, decoding, ratios.",
    "lm_eval_adapter": "Run lm-evaluation-harness tasks on a finished run.",
    "accounting": "Parameter breakdown of an experiment by plugin.",
    "results": "Every run under a folder in one table (an SQLite index, <root>/results.sqlite): a filter "
    "(WHERE clause) or a SELECT over the table `runs`; config keys are columns.",
}


def parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m escarda_lab.{command}",
        description=DESCRIPTIONS[command],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ARGUMENTS[command](p)
    return p


def help_if_asked(module_name: str, command: str) -> None:
    """When the module runs as a script with -h/--help: print the help and exit, before the
    module's heavy imports."""
    if module_name == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):
        parser(command).print_help()
        sys.exit(0)


def _run(p):
    p.add_argument("experiment", help="experiment YAML file (a file with a `grid:` block runs the grid)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50 (grids: grid.seeds=[0,1])")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config (grids: the table of runs) and train nothing"
    )


def _results(p):
    p.add_argument(
        "query",
        nargs="?",
        default="",
        help="a filter such as \"grid = 'leave_one_out' AND status = 'finished'\", or a SELECT over `runs` "
        '(config keys are quoted columns: "model.d_model"); none: every run',
    )
    p.add_argument("--root", default="runs", help="the folder the runs are under (output.dir)")
    p.add_argument("--no-refresh", action="store_true", help="query the index as it is, without re-reading the folders")


def _compare(p):
    p.add_argument(
        "paths",
        nargs="*",
        help="a grid's folder (runs/leave_one_out), or run folders to compare directly: runs/a runs/b "
        "(each with its seed<k>/ runs) or runs/a/seed0 ...; the first is the baseline. With --plan: an "
        "earlier grid whose pooled sd (and family size) plan the next one",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the prospective power of a grid (MDE and seeds needed at Holm's first and last step) "
        "from --sd or an earlier grid, and exit",
    )
    p.add_argument("--sd", type=float, default=None, help="with --plan: prior sd of the paired differences")
    p.add_argument("--family", type=int, default=None, help="with --plan: number of variant comparisons")
    p.add_argument("--seeds", type=int, default=8, help="with --plan: paired seeds the grid would run")
    p.add_argument("--target", type=float, default=None, help="with --plan: the effect to detect (None: the margin)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts")
    p.add_argument(
        "--out",
        default=None,
        help="with run folders: write summary.md, summary.csv, curves.png and forest.png here (a grid's "
        "comparison is always written into the grid folder)",
    )
    p.add_argument(
        "--margin", type=float, default=None, help="equivalence margin (None: the grid's `margin`, else 0.01)"
    )
    p.add_argument(
        "--metric",
        choices=["val_acc", "val_bpb", "val_loss"],
        default=None,
        help="what the verdicts test (None: val_acc for probe grids, else val_bpb)",
    )


def _evaluate(p):
    p.add_argument("run", help="run folder (runs/<name>/seed<k>) or a .ckpt inside one")
    p.add_argument("--text", action="append", default=[], help="bits per byte of a UTF-8 text file (repeatable)")
    p.add_argument(
        "--corpus",
        action="append",
        default=[],
        help="bits per byte of a corpus (name, file or glob; repeatable). Its documents may include the run's "
        "training documents: for held-out numbers use the run's own split (the default)",
    )
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        help="a registered evaluation suite (escarda_lab/suites.py), e.g. minimal_pairs (repeatable)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help='multiple-choice JSONL file of {"context", "choices", "label"} lines; each choice is scored after '
        "a space (lm-eval's target_delimiter); repeatable",
    )
    p.add_argument(
        "--probe", action="append", default=[], help="probe task: accuracy on its test set, with the KV cache"
    )
    p.add_argument("--no-split", action="store_true", help="skip the run's own validation split")
    p.add_argument("--pairs", type=int, default=200, help="minimal pairs per paradigm")
    p.add_argument("--out", default=None, help="JSON file (None: <run>/eval.json)")


def _generate(p):
    p.add_argument("run", help="run folder (runs/<name>/seed<k>) or a .ckpt inside one")
    p.add_argument("--prompt", default="", help="text to continue (after <bos>)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    p.add_argument("--system", default=None, help="ChatML system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _export(p):
    p.add_argument("run", help="run folder (runs/<name>/seed<k>) or a .ckpt inside one")
    p.add_argument("out", help="output folder")


def _bench(p):
    p.add_argument(
        "args", nargs="+", help="experiment or grid files (the first is the baseline), then key=value overrides"
    )
    p.add_argument("--steps", type=int, default=30, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--decode", action="store_true", help="also time decoding without the KV cache")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="auto: as configured (on for GPU); both: every variant eager and compiled",
    )
    p.add_argument(
        "--head",
        choices=["auto", "fused", "unfused", "both"],
        default="auto",
        help="output head: as configured (train.fused_head), fused, unfused (logits materialised) or both",
    )
    p.add_argument(
        "--no-alone", action="store_true", help="one experiment: skip the vanilla+X runs and the vanilla+null floor"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _lm_eval(p):
    p.add_argument("run", help="run folder (runs/<name>/seed<k>) or a .ckpt inside one")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", default=None, help="folder of local task YAML files")
    p.add_argument("--limit", type=int, default=None, help="documents per task (None: all)")
    p.add_argument("--batch-size", type=int, default=16, help="requests scored per forward pass")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep every scored sample (with --output)")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON instead of a table")


def _accounting(p):
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=256")


ARGUMENTS = {
    "run": _run,
    "compare": _compare,
    "results": _results,
    "evaluate": _evaluate,
    "generate": _generate,
    "export": _export,
    "bench": _bench,
    "lm_eval_adapter": _lm_eval,
    "accounting": _accounting,
}
