"""Export: `python -m escarda_lab.export RUN_DIR_OR_CKPT OUT_DIR` writes a Hugging Face folder.

OUT_DIR gets config.json (with `auto_map` and the full escarda_lab config), model.safetensors,
the tokenizer (tokenizer.json + tokenizer_config.json, adding <bos> like our training data),
generation_config.json (stops at <eos> and <|im_end|>) and modeling_escarda.py, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    pipeline("text-generation", model=OUT_DIR, trust_remote_code=True)

work with transformers installed (`pip install escarda_lab[hf]`).
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "export")

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from escarda_lab.errors import UserError
from escarda_lab.io import atomic_write

GLUE = Path(__file__).parent / "hf" / "modeling_escarda.py"

# ChatML as the model card writes it: <bos>, then `<|im_start|>{role}\n{content}<|im_end|>\n` per
# turn, generation after `<|im_start|>assistant\n` (the same ids as escarda_lab.generate --chat).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hf_tokenizer(tok):
    """Our tokenizer as a `tokenizers.Tokenizer` that adds <bos> in front (ids unchanged)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from escarda_lab.tokenizer import SPECIALS

    if tok.kind == "bpe":
        hf = Tokenizer.from_str(tok.hf.to_str())
    else:  # bytes as byte-level characters, id 8 + b, no merges: the same ids as ByteTokenizer
        mapping = _bytes_to_unicode()
        vocab = {s: i for i, s in enumerate(SPECIALS)}
        vocab.update({mapping[b]: len(SPECIALS) + b for b in range(256)})
        hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(SPECIALS)
    hf.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_id)]
    )
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenisation produces)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def export(run: str | Path, out: str | Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from escarda_lab.layers import PAD
    from escarda_lab.run_folder import load_run
    from escarda_lab.tokenizer import EOS, IM_END, SPECIALS

    model, tok, cfg = load_run(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A tied head is not written: transformers ties it back to the embedding on loading
    # (`tie_word_embeddings`), so the loaded model has the run's parameters, not one matrix twice.
    tied = cfg.model.tie_embeddings
    state = {
        f"model.{k}": v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if not (tied and k == "head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the folder is meant to be shared
    escarda = json.loads(json.dumps(asdict(cfg), default=str))
    hf_config = {
        "architectures": ["EscardaForCausalLM"],
        "model_type": "escarda",
        "auto_map": {
            "AutoConfig": "modeling_escarda.EscardaConfig",
            "AutoModelForCausalLM": "modeling_escarda.EscardaForCausalLM",
        },
        "vocab_size": cfg.model.vocab_size,
        "hidden_size": cfg.model.d_model,
        "num_hidden_layers": cfg.model.n_layers,
        "max_position_embeddings": cfg.model.max_seq_len,
        "bos_token_id": tok.bos_id,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "tie_word_embeddings": bool(tied),
        "torch_dtype": "float32",
        "escarda": escarda,
    }
    atomic_write(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    atomic_write(
        out / "generation_config.json",
        json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": [EOS, IM_END], "pad_token_id": PAD}, indent=2) + "\n",
    )
    shutil.copyfile(GLUE, out / "modeling_escarda.py")
    atomic_write(out / "tokenizer.json", hf_tokenizer(tok).to_str())
    atomic_write(
        out / "tokenizer_config.json",
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "additional_special_tokens": SPECIALS[4:],
                "model_max_length": cfg.model.max_seq_len,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from escarda_lab.cli import user_error

    args = arguments.parser("export").parse_args(argv)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print(
            "escarda_lab: export needs safetensors (and transformers to load the result): pip install -e '.[hf]'",
            file=sys.stderr,
        )
        return 2
    try:
        out = export(args.run, args.out)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    print(f"wrote {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
