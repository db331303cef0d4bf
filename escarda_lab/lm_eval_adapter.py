"""lm-evaluation-harness adapter: our run folders as an lm-eval model named `escarda`.

    import escarda_lab.lm_eval_adapter  # registers the model
    lm_eval.simple_evaluate(model="escarda", model_args="pretrained=runs/escarda/seed0",
                            tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks"))

or `python -m escarda_lab.lm_eval_adapter RUN_DIR --tasks NAME --include-path DIR`. Scoring
goes through `escarda_lab.evaluate.Scorer`, the same code as our own evaluation, so local task
files (`dataset_path: json`) give the numbers `escarda_lab.evaluate` gives.
"""

from __future__ import annotations

from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "lm_eval_adapter")

import json
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from escarda_lab.evaluate import Scorer


@register_model("escarda")
class EscardaEvalLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str = 16, device: str = "cpu", **kwargs):
        super().__init__()
        from escarda_lab.run_folder import load_run

        model, self.tok, self.cfg = load_run(pretrained)
        self.model = model.to(device)
        size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.model, self.tok, batch_size=size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([r.args[:2] for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests) -> list[str]:
        from escarda_lab.generate import generate
        from escarda_lab.tokenizer import EOS, IM_END

        out = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            prompt = [self.tok.bos_id] + self.tok.encode(context)
            new = generate(
                self.model,
                prompt,
                int(kw.get("max_gen_toks", 256)),
                temperature=temperature,
                stop_ids=(EOS, IM_END),
                seed=0,
            )
            text = self.tok.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def table(results: dict) -> str:
    """lm-eval's results as one line per task and metric: value ± stderr."""
    lines = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or "stderr" in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{filt}")
            spread = f" ± {err:.4f}" if isinstance(err, (int, float)) else ""
            lines.append(f"{task:<28} {name:<14} {value:.4f}{spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from escarda_lab import arguments
    from escarda_lab.io import write_json

    args = arguments.parser("lm_eval_adapter").parse_args(argv)
    res = lm_eval.simple_evaluate(
        model=EscardaEvalLM(args.run, batch_size=args.batch_size),
        tasks=args.tasks.split(","),
        limit=args.limit,
        log_samples=args.log_samples,
        task_manager=TaskManager(include_path=args.include_path),
    )
    print(json.dumps(res["results"], indent=2, default=str) if args.json else table(res["results"]))
    if args.output:
        keep = {k: res[k] for k in ("results", "configs", "versions", "n-shot", "samples") if k in res}
        write_json(args.output, keep)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
