"""Generation: `python -m escarda_lab.generate RUN_DIR --prompt "..." [--chat]`.

KV-cache decoding with temperature, top-k and top-p (nucleus) sampling, stop ids, seeded
sampling, and ChatML prompts: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, generation starting
after `<|im_start|>assistant\\n` (the Escarda-86M card's recipe: top-p 0.9, stop on <|im_end|>).
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "generate")

import sys

import torch
from torch import Tensor

from escarda_lab.errors import UserError
from escarda_lab.tokenizer import IM_END, IM_START, SPECIALS


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    start, end = SPECIALS[IM_START], SPECIALS[IM_END]
    text = "".join(f"{start}{m['role']}\n{m['content']}{end}\n" for m in messages)
    return text + (f"{start}assistant\n" if add_generation_prompt else "")


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from logits [V]. temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        outside = p.cumsum(0) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        p = p.masked_fill(outside, 0.0)
        return int(idx[torch.multinomial(p / p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after `prompt` (stops at a stop id, which is not returned, or at max_seq_len)."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    max_len = model.cfg.max_seq_len
    ids = list(prompt)[-max_len:]
    cache = model.new_cache() if use_cache else None
    logits = model(torch.tensor([ids], device=device), cache=cache).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample(logits.cpu(), temperature, top_k, top_p, g)
        if nxt in stop_ids:
            break
        out.append(nxt)
        if len(ids) + len(out) >= max_len:
            break
        if use_cache:
            logits = model(torch.tensor([[nxt]], device=device), cache=cache).logits[0, -1]
        else:
            logits = model(torch.tensor([ids + out], device=device)).logits[0, -1]
    return out


def main(argv: list[str] | None = None) -> int:
    from escarda_lab.cli import prepare_torch, quiet_libraries, user_error
    from escarda_lab.run_folder import load_run

    args = arguments.parser("generate").parse_args(argv)
    quiet_libraries()
    prepare_torch()
    try:
        model, tok, _ = load_run(args.run)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    if args.chat:
        msgs = [{"role": "system", "content": args.system}] if args.system else []
        text = chatml(msgs + [{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    prompt = [tok.bos_id] + tok.encode(text)
    stops = (IM_END, tok.eos_id)
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stops, args.seed)
    print(tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
