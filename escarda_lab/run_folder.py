"""A run folder: where it is, whether a config may use it, and the trained model inside it.

<output.dir>/<name>/seed<seed>/   config.yaml  metrics.json  last.ckpt  tokenizer  events...
"""

from __future__ import annotations

from pathlib import Path

from escarda_lab import config
from escarda_lab.errors import ConfigError, UserError


def run_dir(cfg) -> Path:
    """<output.dir>/<name>/seed<seed>/ (a grid sets output.dir to runs/<grid> and name to the variant)."""
    return Path(cfg.output.dir) / cfg.name / f"seed{cfg.seed}"


def check_writable(folder: Path, source: str) -> None:
    """A UserError naming output.dir when `folder` cannot be a folder (a file on its path) or its
    nearest existing ancestor cannot be written."""
    import os

    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    source,
                    "output.dir",
                    f"{parent} is a file, so the run folder {folder} cannot be made",
                    "point output.dir at a folder (or a path that does not exist yet)",
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    source, "output.dir", f"{parent} is not writable", "point output.dir at a folder you can write"
                )
            return


STORAGE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EFBIG"}


def storage_error(
    e: BaseException, folder: Path, what: str, key: str = "output.dir", fix: str | None = None
) -> UserError | None:
    """The one-paragraph error for a write that failed for lack of space or permission (torch's
    zip writer reports ENOSPC as a RuntimeError "file write failed", numpy's tofile as "N requested
    and M written"), else None."""
    import errno
    import shutil

    name = errno.errorcode.get(getattr(e, "errno", None) or -1, "")
    text = str(e)
    short = "requested and" in text and "written" in text  # numpy's short write: the disk filled up
    if name not in STORAGE_ERRNOS and "write failed" not in text and "No space left" not in text and not short:
        return None
    try:
        free = shutil.disk_usage(next(p for p in [folder, *folder.parents] if p.exists())).free / 2**20
    except (OSError, StopIteration):
        free = float("nan")
    why = "the disk is read-only or not writable" if name in ("EROFS", "EACCES") else "no space left on the device"
    return UserError(
        str(folder),
        key,
        f"writing {what} into {folder} failed: {why} ({free:.1f} MB free there); everything written before is intact",
        fix
        or f"free space (or point {key} at a larger disk) and rerun the same command: training resumes "
        "from the last complete checkpoint",
    )


# Keys that do not change a run's result: how it is logged, checkpointed, placed and compiled
# (the data order is the step and per-rank shares add up to the same global batch; the final
# numbers score the whole validation split whatever the periodic validation did).
RESULT_NEUTRAL = {
    "train.log_every",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_batches",
    "train.compile",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.accelerator",
    "output.dir",
    "data.cache_dir",
}


def check_same_config(folder: Path, new_yaml: str, source: str) -> None:
    """Refuse a run folder written by a config that differs in anything but RESULT_NEUTRAL keys,
    whatever its status: resuming would mix two runs, and skipping would report old numbers."""
    old = folder / "config.yaml"
    if old.exists() and old.read_text() != new_yaml:
        from omegaconf import OmegaConf

        a = config.flatten(OmegaConf.to_container(OmegaConf.create(old.read_text())))
        b = config.flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))
        default = config.flatten(config.schema_class()())
        # a key added to the schema since the run was written, at its default: the run trained that way
        added = {k for k in b.keys() - a.keys() if k in default and b[k] == default[k]}
        diff = sorted(
            k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESULT_NEUTRAL and k not in added
        )
        if diff:
            changes = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
            raise ConfigError(
                source,
                ", ".join(diff[:4]),
                f"{folder} already holds a run with a different config ({changes})",
                "give this experiment another `name` (or seed), or delete that folder to start over",
            )


def checksum(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(ckpt: Path) -> None:
    """`<ckpt>.sha256` beside a checkpoint, so that a damaged file is never loaded silently."""
    from escarda_lab.io import atomic_write

    atomic_write(ckpt.with_name(ckpt.name + ".sha256"), checksum(ckpt) + "\n")


def verify_checkpoint(ckpt: Path) -> None:
    """A UserError naming `ckpt` unless it matches its checksum (or, without one, reads as a zip)."""
    import zipfile

    from escarda_lab.io import read_json

    if (read_json(ckpt.parent / "metrics.json") or {}).get("status") == "finished":  # its weights are lost
        fix = (
            f"restore {ckpt} from a copy, or delete the run folder {ckpt.parent} (metrics.json with it, "
            "else a grid skips the run as finished) to train it again"
        )
    else:
        fix = f"delete {ckpt} (and its .sha256) to restart the run from scratch, or restore it from a copy"
    recorded = ckpt.with_name(ckpt.name + ".sha256")
    if recorded.exists():
        if checksum(ckpt) != recorded.read_text().strip():
            raise UserError(str(ckpt), None, "the checkpoint does not match its checksum: it is damaged", fix)
        return
    try:
        with zipfile.ZipFile(ckpt) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(str(ckpt), None, f"the checkpoint cannot be read ({e})", fix) from None
    if bad is not None:
        raise UserError(str(ckpt), None, f"the checkpoint is damaged (CRC error in {bad})", fix)


def load_run(path: str | Path):
    """(model, tokenizer, cfg) from a run folder or a checkpoint inside one."""
    import torch

    from escarda_lab import tokenizer
    from escarda_lab.model import EscardaLM

    path = Path(path)
    folder, ckpt = (path.parent, path) if path.suffix == ".ckpt" else (path, path / "last.ckpt")
    if not (folder / "config.yaml").exists() or not ckpt.exists():
        raise UserError(
            str(path),
            None,
            "not a run folder (needs config.yaml and last.ckpt)",
            "pass runs/<name>/seed<k>/ of a run that has saved a checkpoint",
        )
    cfg = config.load(folder / "config.yaml")
    verify_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = EscardaLM(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval(), tokenizer.run_tokenizer(folder, cfg.data), cfg


def inputs_of(cfg, tokens) -> dict:
    """What a run reads, pinned when it starts: the corpus, a digest of its tokens (the token
    cache's shard checksums and sizes, or the probe set), and a digest of the tokenizer."""
    import hashlib
    import json

    meta = {k: v for k, v in tokens.meta.items() if k not in ("corpus",)}
    tok = tokens.tokenizer
    tok_text = tok.hf.to_str() if hasattr(tok, "hf") else f"{type(tok).__name__}:{tok.vocab_size}"
    return {
        "corpus": str(cfg.data.corpus),
        "tokens": hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:32],
        "tokenizer": hashlib.sha256(tok_text.encode()).hexdigest()[:32],
    }


def check_inputs(folder: Path, pinned: dict, resuming: bool, source: str) -> None:
    """A fresh run pins its inputs in inputs.json; a resume that would read other tokens or another
    tokenizer (the corpus files were edited, or the cache rebuilt with a new tokenizer) is refused."""
    import json

    from escarda_lab.io import atomic_write, read_json

    path = folder / "inputs.json"
    before = read_json(path) if resuming else None
    if before is None:
        atomic_write(path, json.dumps(pinned, indent=2) + "\n")
        return
    changed = [k for k in ("tokens", "tokenizer") if before.get(k) != pinned[k]]
    if changed:
        what = " and ".join({"tokens": "the corpus's tokens", "tokenizer": "the tokenizer"}[k] for k in changed)
        raise UserError(
            source,
            "data.corpus",
            f"{folder} started on other inputs: {what} differ from those pinned in {path} when it started "
            f"(corpus {before.get('corpus')!r} then, {pinned['corpus']!r} now); resuming would train the rest on "
            "different data",
            "restore the corpus files the run started with, or delete the run folder (or set another `name`) "
            "to start over on the new data",
        )
