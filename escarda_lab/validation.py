"""Config checks beyond the schema's types: bounds, shapes that must agree, one plugin per
exclusive slot, each plugin's own `check`; and the one-paragraph errors for unknown keys and
wrong types. Every problem is a ConfigError naming the file (or command line), the key and the fix."""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from escarda_lab import registry
from escarda_lab.errors import ConfigError

MAX_NAME = 200  # bytes: filesystems allow 255 per folder name; grids and tuning append tags
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_bounds(obj: Any, where, prefix: str = "") -> None:
    """Every `bounded` field of a typed config inside its bounds, else a ConfigError."""
    for key, value, bounds in bounded_fields(obj, prefix):
        problem = registry.out_of_bounds(value, bounds)
        if problem:
            raise ConfigError(where(key), key, problem, "give a value inside those bounds")


def unknown_key(src: str, cfg: DictConfig, full_key: str) -> ConfigError:
    parent_key, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    known = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hint = f"did you mean `{'.'.join(filter(None, [parent_key, close[0]]))}`?" if close else ""
    where = f"`{parent_key}`" if parent_key else "the top level"
    if parent_key == "components":
        fix = f"{hint + ' ' if hint else ''}registered components are: {', '.join(known)}"
        return ConfigError(src, full_key, f"unknown component `{leaf}`", fix)
    fix = f"{hint + ' ' if hint else ''}valid keys under {where}: {', '.join(known)}"
    return ConfigError(src, full_key, "unknown key", fix)


def wrong_type(src: str, cfg: DictConfig, e: Exception) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    node = OmegaConf.select(cfg, key) if key != "?" else None
    default = repr(node) if node is not None and not isinstance(node, (DictConfig, ListConfig)) else None
    msg = str(e).splitlines()[0]
    if "expected one of" in msg:
        return ConfigError(src, key, msg.replace("Invalid value", "invalid value"), "use one of the listed values")
    fix = (
        f"give a value of the right type (the default is {default})"
        if default
        else "give a value of the type the schema expects"
    )
    return ConfigError(src, key, f"wrong type: {msg}", fix)


def bounded_fields(obj: Any, prefix: str = ""):
    """(dotted key, value, bounds) of every `bounded` field of a config, plugins included."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if hasattr(value, "__dataclass_fields__"):
            if not (prefix == "components." and not getattr(value, "enabled", True)):
                yield from bounded_fields(value, f"{prefix}{f.name}.")
        elif "bounds" in f.metadata:
            yield f"{prefix}{f.name}", value, f.metadata["bounds"]


def validate(cfg: Any, where) -> None:
    """Semantic checks the type system cannot express; `where(key)` names the file that set key."""

    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(where(key), key, problem, fix)

    m, d, t = cfg.model, cfg.data, cfg.train
    need(
        bool(cfg.name) and cfg.name not in (".", "..") and "/" not in cfg.name and "\\" not in cfg.name,
        "name",
        f"name {cfg.name!r} is not a plain folder name (a run goes to <output.dir>/<name>/seed<k>/)",
        "use letters, digits, '-', '_' or '.', e.g. `name: no_engram`; put runs elsewhere with output.dir",
    )
    need(
        len(cfg.name.encode()) <= MAX_NAME,
        "name",
        f"name is {len(cfg.name.encode())} bytes long; a run folder's name may have at most {MAX_NAME} "
        "(the filesystem allows 255, and a grid appends tags)",
        "use a shorter name",
    )
    check_bounds(cfg, where)
    need(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}",
        "pick n_kv_heads dividing n_heads (1 = multi-query, n_heads = full multi-head)",
    )
    need(
        0 <= m.rope_dim <= m.head_dim,
        "model.rope_dim",
        f"rope_dim={m.rope_dim} must lie in [0, head_dim={m.head_dim}]",
        "the rotary part is a slice of each head; set rope_dim <= head_dim",
    )
    need(
        m.rope_dim % 2 == 0,
        "model.rope_dim",
        f"rope_dim={m.rope_dim} is odd",
        "rotary dims come in pairs; use an even number",
    )
    need(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
        "lower data.seq_len or raise model.max_seq_len",
    )
    need(
        d.tokenizer.kind != "bpe" or d.tokenizer.vocab_size >= 512,
        "data.tokenizer.vocab_size",
        f"a BPE vocabulary of {d.tokenizer.vocab_size} cannot hold 256 bytes, specials and merges",
        "use at least 512 (the released model uses 16512)",
    )
    need(math.isfinite(t.lr), "train.lr", f"learning rate must be finite, got {t.lr}", "use e.g. 3.0e-3")
    need(
        0 <= t.warmup_steps <= t.max_steps,
        "train.warmup_steps",
        f"warmup_steps={t.warmup_steps} must lie in [0, max_steps={t.max_steps}]",
        "shorten the warmup or train longer",
    )
    need(
        t.final_val_tokens == 0 or t.final_val_tokens >= cfg.data.seq_len,
        "train.final_val_tokens",
        f"final_val_tokens={t.final_val_tokens} is less than one window of seq_len={cfg.data.seq_len}",
        "use 0 (the whole split) or at least data.seq_len tokens",
    )
    need(
        (t.average_last - 1) * (t.average_every or t.val_every) < t.max_steps,
        "train.average_last",
        f"average_last={t.average_last} scores {t.average_every or t.val_every} steps apart start before "
        f"step 0 (max_steps={t.max_steps})",
        "average fewer scores or space them closer (train.average_every)",
    )
    need(
        t.compile in ("auto", True, False, *COMPILE_MODES),
        "train.compile",
        f"compile must be auto, true, false or a torch.compile mode, got {t.compile!r}",
        "use auto (compiled on a GPU, eager on CPU), true, false, or one of " + ", ".join(COMPILE_MODES),
    )
    for slot, spec in registry.SLOTS.items():
        on = [n for n, e in registry.toggleable().items() if e.slot == slot and getattr(cfg.components, n).enabled]
        need(
            not spec.exclusive or len(on) <= 1,
            f"components.{on[-1] if on else slot}.enabled",
            f"{' and '.join(on)} are both enabled but the `{slot}` slot takes one plugin",
            "disable all but one of them",
        )
    for name in registry.toggleable():
        pc = getattr(cfg.components, name)
        if pc.enabled and hasattr(pc, "check"):
            for key, problem, fix in pc.check(cfg.model):
                need(False, f"components.{name}.{key}", problem, fix)
