"""The one place for atomic writes (temp file in the same folder, fsync, rename), JSON, and nested
mappings flattened to dotted keys."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path in `path`'s folder to write; on success it is renamed over `path` (a
    reader sees the old file or the new one, never half of one); on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, or damaged (truncated, not JSON: a
    warning names it; a run whose metrics.json is damaged is then resumed, not trusted)."""
    import logging

    path = Path(path)
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        logging.getLogger("escarda_lab").warning("%s is damaged (%s): ignored", path, e)
        return None
    if not isinstance(found, dict):
        logging.getLogger("escarda_lab").warning("%s holds a %s, not an object: ignored", path, type(found).__name__)
        return None
    return found


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a damaged line (truncated, binary, not an object) is
    skipped with a warning naming the file and line, so one bad line never loses the rest."""
    import logging

    out = []
    raw = Path(path).read_bytes()
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            logging.getLogger("escarda_lab").warning("%s line %d is damaged (%s): skipped", path, i, e)
            continue
        if isinstance(r, dict):
            out.append(r)
        else:
            logging.getLogger("escarda_lab").warning("%s line %d is not an object: skipped", path, i)
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping / dataclass -> {"a.b.c": value} (lists stay lists; an empty mapping has no keys)."""
    if hasattr(d, "__dataclass_fields__"):
        d = {f.name: getattr(d, f.name) for f in fields(d)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "__dataclass_fields__"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
