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


def check_same_config(folder: Path, new_yaml: str, source: str) -> None:
    """Refuse to resume a run folder written by a different config (it would mix two runs)."""
    old = folder / "config.yaml"
    if old.exists() and old.read_text() != new_yaml:
        from omegaconf import OmegaConf

        a = config.flatten(OmegaConf.to_container(OmegaConf.create(old.read_text())))
        b = config.flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ConfigError(
            source,
            ", ".join(diff[:4]),
            f"{folder} already holds a run with a different config",
            "give this experiment another `name` (or seed), or delete that folder to start over",
        )


def load_run(path: str | Path):
    """(model, tokenizer, cfg) from a run folder or a checkpoint inside one."""
    import torch

    from escarda_lab import data
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
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = EscardaLM(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval(), data.load_tokenizer(folder, cfg.data.tokenizer.kind), cfg
