"""Evaluation: `python -m escarda_lab.evaluate RUN_DIR_OR_CKPT [--no-split] [--text FILE]
[--corpus NAME] [--suite minimal_pairs] [--task FILE.jsonl] [--probe TASK] [--out FILE.json]`
(every option: `--help`).

bpb = Σ NLL (nats) over predicted tokens / (ln 2 × Σ UTF-8 bytes of those tokens).
Special tokens count 0 bytes but their NLL counts, so bpb is tokenizer-independent; byte
perplexity = 2^bpb. Continuations are scored as lm-eval scores them (`Scorer`): the context and
continuation are encoded together, the continuation's tokens are those past the context's, and
the sequence starts with <bos> (lm-eval's end-of-text prefix for an empty context).
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "evaluate")

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from escarda_lab.errors import DataError, UserError
from escarda_lab.stats import mean_stderr


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    return nll_sum / (math.log(2) * max(n_bytes, 1))


SUMS = 4  # [nll_sum, n_tokens, n_bytes, n_correct]


def window_nll(model, batch: dict, token_bytes: Tensor) -> Tensor:
    """[nll_sum, n_tokens, n_bytes, n_correct] (float64) over the valid labels (!= -100) of one
    batch; n_correct counts labels that are the argmax (exact match: a probe task's accuracy)."""
    labels = batch["labels"]
    valid = labels != -100
    out = model(batch["ids"])
    correct = ((out.logits.argmax(-1) == labels) & valid).sum()  # logits first: NLL reuses them
    nll = out.nll_lse(labels)[0].sum()
    n_bytes = token_bytes.to(labels.device)[labels.clamp(min=0)][valid].sum()
    return torch.stack([nll.double(), valid.sum().double(), n_bytes.double(), correct.double()])


def nll_summary(sums: Tensor) -> dict[str, float]:
    """[nll_sum, n_tokens, n_bytes, n_correct] -> {"loss", "bpb", "acc", "tokens", "bytes"}."""
    nll, n, b, c = (float(x) for x in sums)
    return {
        "loss": nll / max(n, 1),
        "bpb": bits_per_byte(nll, b),
        "acc": c / max(n, 1),
        "tokens": int(n),
        "bytes": int(b),
    }


@torch.no_grad()
def score_rows(model, loader, token_bytes: Tensor, device=None) -> Tensor:
    """[batches, SUMS] (float64): each batch's [nll, tokens, bytes, correct] under `model`."""
    was_training = model.training
    model.eval()
    rows = [torch.zeros(SUMS, dtype=torch.float64)]
    for batch in loader:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        rows.append(window_nll(model, batch, token_bytes).cpu())
    model.train(was_training)
    return torch.stack(rows[1:]) if len(rows) > 1 else rows[0][None]


def score(model, loader, token_bytes: Tensor, device=None) -> Tensor:
    """Summed [nll, tokens, bytes, correct] of `model` over every batch of `loader`."""
    return score_rows(model, loader, token_bytes, device).sum(0)


def bpb_se(rows: Tensor) -> float:
    """Standard error of bits per byte over the batches of `rows` ([batches, SUMS]): the ratio
    estimator's delta-method variance, Σ(nll_i − R·bytes_i)² / (m(m−1)·mean(bytes)²), R = Σnll/Σbytes."""
    nll, n_bytes = rows[:, 0], rows[:, 2]
    m = len(rows)
    if m < 2 or float(n_bytes.sum()) <= 0:
        return math.nan
    ratio = nll.sum() / n_bytes.sum()
    var = ((nll - ratio * n_bytes) ** 2).sum() / (m * (m - 1) * n_bytes.mean() ** 2)
    return float(var.sqrt()) / math.log(2)


# ------------------------------------------------------------------------ continuation scoring


class Scorer:
    """Log-likelihoods of continuations given contexts, batched (lm-eval's `loglikelihood`)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, device=None):
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = device or next(model.parameters()).device
        self.max_len = model.cfg.max_seq_len

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing context whitespace moves to the continuation, and the
        continuation's tokens are those of context + continuation past the context's."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        return [self.tok.bos_id] + ctx, whole[len(ctx) :]

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """[(sum of log P(continuation tokens | context), whether every one is the argmax)]."""
        encoded = [self.encode_pair(c, x) for c, x in requests]
        return self._score(encoded)

    @torch.no_grad()
    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[float]:
        """Log-likelihood of each whole text after <bos>. Windows predict `stride` tokens each
        (default max_seq_len: lm-eval's disjoint rolling windows) with as much context before
        them as fits; a smaller stride is the usual sliding-window evaluation."""
        import logging
        import time

        log = logging.getLogger("escarda_lab")
        stride = stride or self.max_len
        out = []
        for text in texts:
            ids = [self.tok.bos_id] + self.tok.encode(text)
            pieces = []
            for start in range(1, len(ids), stride):
                end = min(start + stride, len(ids))
                pieces.append((ids[max(0, end - 1 - self.max_len) : start], ids[start:end]))
            chunk, total, t0, last = 64 * self.batch_size, 0.0, time.perf_counter(), time.perf_counter()
            for i in range(0, len(pieces), chunk):  # in chunks, so that long texts report progress
                total += sum(lp for lp, _ in self._score(pieces[i : i + chunk]))
                done, now = min(i + chunk, len(pieces)), time.perf_counter()
                if len(pieces) > chunk and (now - last > 30 or done == len(pieces)):
                    last = now
                    eta = (now - t0) / done * (len(pieces) - done)
                    log.info("scored %d/%d windows of %d tokens (ETA %.0f s)", done, len(pieces), len(ids), eta)
            out.append(total)
        return out

    def _score(self, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            seqs = []
            for i in idx:
                ctx, cont = encoded[i]
                if not cont or len(cont) > self.max_len:
                    raise DataError(
                        "evaluate",
                        None,
                        f"a continuation encodes to {len(cont)} tokens",
                        f"give every choice some text, at most model.max_seq_len={self.max_len} tokens",
                    )
                seqs.append((ctx + cont)[-(self.max_len + 1) :])
            width = max(len(s) for s in seqs) - 1
            ids = torch.full((len(idx), width), self.tok.pad_id, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s) - 1] = torch.tensor(s[:-1])
            logp = self.model(ids.to(self.device)).logits.float().log_softmax(-1).cpu()
            for row, i in enumerate(idx):
                n, s = len(encoded[i][1]), seqs[row]
                pos = torch.arange(len(s) - 1 - n, len(s) - 1)
                target = torch.tensor(s[-n:])
                lp = logp[row, pos]
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- the suites


def text_bpb(scorer: Scorer, text: str, stride: int | None = None) -> dict:
    """Bits per UTF-8 byte of `text` with sliding windows (stride: half the context by default)."""
    stride = stride or max(1, scorer.max_len // 2)
    nll = -scorer.loglikelihood_rolling([text], stride)[0]
    n_bytes = len(text.encode("utf-8"))
    bpb = bits_per_byte(nll, n_bytes)
    return {"bpb": bpb, "byte_perplexity": 2**bpb, "nll": nll, "bytes": n_bytes, "stride": stride}


def score_val_split(model, dm, token_bytes: Tensor, device=None) -> dict:
    """The whole validation split in non-overlapping windows (a probe task: its whole test set):
    the number a run ends with."""
    rows = score_rows(model, dm.final_loader(), token_bytes, device)
    val = nll_summary(rows.sum(0))
    batch_bpb = [round(bits_per_byte(float(r[0]), float(r[2])), 5) for r in rows]
    return {**val, "byte_perplexity": 2 ** val["bpb"], "bpb_se": bpb_se(rows), "batch_bpb": batch_bpb}


def split_bpb(model, cfg, source: str, tokenizer=None) -> dict:
    """The run's own validation split, scored by the same function as the end of training (a
    missing token cache is rebuilt with the run's own tokenizer: nothing is trained here)."""
    from escarda_lab import config, data

    tokens = data.prepare(cfg.data, source, config.seeds(cfg)[1], tokenizer)
    return score_val_split(model, data.datamodule(cfg, tokens), tokens.token_bytes, next(model.parameters()).device)


@torch.no_grad()
def cached_predictions(model, inputs: Tensor) -> Tensor:
    """Argmax predictions [B, T] decoding token by token through the KV cache (what generation
    sees), for comparison with one full forward pass."""
    cache = model.new_cache()
    return torch.cat([model(inputs[:, t : t + 1], cache=cache).logits.argmax(-1) for t in range(inputs.shape[1])], 1)


@torch.no_grad()
def probe(model, cfg, task: str, source: str, cache_examples: int = 256, batch_size: int = 64) -> dict:
    """A probe task's test set: exact-match accuracy and loss at the scored positions (one full
    forward pass), and the accuracy of KV-cache decoding on the first `cache_examples` examples
    with the fraction of predictions it shares with the full pass (1.0 when the cache is exact).
    A run trained on the task is scored on its own test set (its parameters and data seed); any
    other run on the task's defaults."""
    from dataclasses import replace

    from escarda_lab import config, data, probes

    if task not in probes.TASKS:
        raise UserError(source, "--probe", f"unknown probe task {task!r}", f"use one of: {', '.join(probes.TASKS)}")
    own = probes.task_of(cfg.data.corpus) == task
    d = cfg.data if own else replace(cfg.data, corpus=f"probe:{task}", probe=type(cfg.data.probe)())
    if not own:
        d = replace(d, seq_len=min(probes.TASKS[task].seq_len, cfg.model.max_seq_len))
    need = data.vocab_size(d, source)
    if need > cfg.model.vocab_size:
        raise UserError(
            source,
            "--probe",
            f"probe:{task} needs a vocabulary of {need} ids, the model has {cfg.model.vocab_size}",
            f"evaluate a run trained on probe:{task} (experiments/probes/{task}.yaml)",
        )
    tokens = data.prepare(d, source, config.seeds(cfg)[1] if own else 0)
    ps = tokens.probe
    device = next(model.parameters()).device
    x, y = torch.from_numpy(ps.test_inputs), torch.from_numpy(ps.test_labels)
    sums = torch.zeros(SUMS, dtype=torch.float64)
    model.eval()
    for i in range(0, len(x), batch_size):
        batch = {"ids": x[i : i + batch_size].to(device), "labels": y[i : i + batch_size].to(device)}
        sums += window_nll(model, batch, tokens.token_bytes).cpu()
    out = {"task": task, "params": ps.params, "seq_len": d.seq_len, "examples": len(x), **nll_summary(sums)}
    out["scored"] = out.pop("tokens")
    del out["bytes"], out["bpb"]
    if cache_examples:
        xs, ys = x[:cache_examples].to(device), y[:cache_examples]
        cached = cached_predictions(model, xs).cpu()
        full = model(xs).logits.argmax(-1).cpu()
        scored = ys != -100
        out["cache"] = {
            "examples": len(xs),
            "acc": float((cached == ys)[scored].float().mean()),
            "acc_full_pass": float((full == ys)[scored].float().mean()),
            "agreement": float((cached == full)[scored].float().mean()),
        }
    return out


@dataclass
class Choice:
    context: str
    choices: list[str]
    label: int


def read_task(path: str | Path) -> list[Choice]:
    """A JSONL file of {"context": str, "choices": [str, ...], "label": int} lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "task file not found", "pass a JSONL file of {context, choices, label} lines")
    docs = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            doc = Choice(str(d["context"]), [str(c) for c in d["choices"]], int(d["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}:{no}",
                None,
                f"not a task line ({type(e).__name__}: {e})",
                'write one JSON object per line: {"context": "...", "choices": ["a", "b"], "label": 0}',
            ) from None
        if not doc.choices or not 0 <= doc.label < len(doc.choices):
            raise DataError(
                f"{path}:{no}",
                "label",
                f"label {doc.label} does not index the {len(doc.choices)} choices",
                "give label as the 0-based index of the right choice",
            )
        docs.append(doc)
    if not docs:
        raise DataError(str(path), None, "the task file has no lines", "add at least one task line")
    return docs


def multiple_choice(scorer: Scorer, docs: list[Choice], delimiter: str = " ") -> dict:
    """lm-eval's multiple-choice metrics. Each choice is scored as log P(delimiter + choice |
    context); acc takes the argmax, acc_norm the argmax after dividing by the choice's length in
    characters (lm-eval's `acc_norm`), acc_bytes after dividing by its UTF-8 length in bytes
    (lm-eval's `acc_bytes`); ties go to the first choice; standard errors as lm-eval's."""
    requests = [(d.context, delimiter + c) for d in docs for c in d.choices]
    lls = [ll for ll, _ in scorer.loglikelihood(requests)]
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    k = 0
    for d in docs:
        scores = lls[k : k + len(d.choices)]
        k += len(d.choices)
        for name, length in [
            ("acc", lambda c: 1.0),
            ("acc_norm", len),
            ("acc_bytes", lambda c: len(c.encode("utf-8"))),
        ]:
            normed = [s / length(c) for s, c in zip(scores, d.choices)]
            hits[name].append(float(max(range(len(normed)), key=normed.__getitem__) == d.label))
    out: dict = {"n": len(docs)}
    for name, h in hits.items():
        out[name], out[f"{name}_stderr"] = sum(h) / len(h), mean_stderr(h)
    return out


# ---------------------------------------------------------------------------------------- CLI


def eval_text(path: Path) -> str:
    """A --text file, refused when missing, empty or not text: a bpb over no bytes is not a result."""
    from escarda_lab.corpora import read_text

    if not path.is_file():
        raise DataError(str(path), None, "text file not found", "pass an existing UTF-8 text file to --text")
    text = read_text(path, "command line", "--text")
    if not text.strip():
        raise DataError(str(path), None, "the text file is empty", "pass a file with text in it to --text")
    return text


def evaluate(
    run: str | Path,
    split: bool = True,
    texts: list[str] = (),
    corpora: list[str] = (),
    suites: list[str] = (),
    tasks: list[str] = (),
    pairs_per_paradigm: int = 200,
    seed: int = 0,
    probe_tasks: list[str] = (),
) -> dict:
    from escarda_lab.corpora import corpus_files
    from escarda_lab.run_folder import load_run
    from escarda_lab.suites import SUITES

    model, tok, cfg = load_run(run)
    scorer = Scorer(model, tok)
    out: dict = {"run": str(run)}
    if split:
        out["val"] = split_bpb(model, cfg, str(run), tok)
    for t in texts:
        out.setdefault("text", {})[str(t)] = text_bpb(scorer, eval_text(Path(t)))
    for name in corpora:
        if name == cfg.data.corpus or (cfg.data.corpus == "classics" and name in ("shakespeare", "bigtxt")):
            import logging

            logging.getLogger("escarda_lab").warning(
                "--corpus %s: the run trained on %s, so this bpb includes documents it trained on; "
                "the held-out number is the run's own split (evaluate without --no-split)",
                name,
                cfg.data.corpus,
            )
        text = "\n\n".join(body for _, body in corpus_files(name, "--corpus"))
        out.setdefault("corpus", {})[name] = text_bpb(scorer, text)
    for suite in suites:
        if suite not in SUITES:
            raise UserError("command line", "--suite", f"unknown suite {suite!r}", f"use one of: {', '.join(SUITES)}")
        out[suite] = SUITES[suite].run(scorer, pairs_per_paradigm, seed)
    for t in tasks:
        out.setdefault("tasks", {})[Path(t).stem] = multiple_choice(scorer, read_task(t))
    for t in probe_tasks:
        out.setdefault("probes", {})[t] = probe(model, cfg, t, str(run))
    return out


def report(res: dict) -> str:
    lines = []
    if "val" in res:
        v = res["val"]
        lines.append(
            f"val split: loss {v['loss']:.4f}  bpb {v['bpb']:.4f}  byte perplexity {v['byte_perplexity']:.3f}"
            f"  acc {v['acc']:.4f}"
        )
    for name, v in res.get("probes", {}).items():
        line = f"probe {name}: acc {v['acc']:.4f}  loss {v['loss']:.4f}  ({v['scored']:,} scored positions)"
        if "cache" in v:
            c = v["cache"]
            line += (
                f"; KV cache on {c['examples']}: acc {c['acc']:.4f} "
                f"(full pass {c['acc_full_pass']:.4f}, agree {c['agreement']:.4f})"
            )
        lines.append(line)
    for kind in ["text", "corpus"]:
        for name, v in res.get(kind, {}).items():
            lines.append(
                f"{kind} {name}: bpb {v['bpb']:.4f}  byte perplexity {v['byte_perplexity']:.3f}  ({v['bytes']:,} bytes)"
            )
    if "minimal_pairs" in res:
        from escarda_lab.minimal_pairs import below_chance

        lines.append("minimal pairs (acc ± stderr):")
        flags = below_chance(res["minimal_pairs"])
        for name, v in res["minimal_pairs"].items():
            flag = f"  BELOW CHANCE by > 3 s.e.: {flags[name]}" if name in flags else ""
            lines.append(f"  {name:<28} {v['acc']:.3f} ± {v['acc_stderr']:.3f}  (n={v['n']}){flag}")
    for name, v in res.get("tasks", {}).items():
        lines.append(
            f"task {name}: acc {v['acc']:.3f} ± {v['acc_stderr']:.3f}  acc_norm {v['acc_norm']:.3f} "
            f"± {v['acc_norm_stderr']:.3f}  (n={v['n']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    from escarda_lab.cli import prepare_torch, quiet_libraries, user_error
    from escarda_lab.io import write_json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = arguments.parser("evaluate").parse_args(argv)
    quiet_libraries()
    prepare_torch()
    try:
        res = evaluate(
            args.run,
            not args.no_split,
            args.text,
            args.corpus,
            args.suite,
            args.task,
            args.pairs,
            probe_tasks=args.probe,
        )
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    run = Path(args.run)
    out = Path(args.out) if args.out else (run.parent if run.suffix == ".ckpt" else run) / "eval.json"
    write_json(out, res)
    print(report(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
