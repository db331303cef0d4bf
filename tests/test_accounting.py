"""Accounting: the released shape builds on the meta device with the card's parameter count."""

from __future__ import annotations

from escarda_lab import config
from escarda_lab.accounting import build_on_meta, main, param_counts
from tests.conftest import ROOT


def test_escarda_86m_builds_on_meta_with_86_to_97m_parameters():
    model = build_on_meta(config.load(ROOT / "experiments/escarda_86m.yaml"))
    assert next(model.parameters()).is_meta
    counts = param_counts(model)
    assert 86e6 <= counts["total"] <= 97e6
    for plugin in ("mla", "engram", "hash_lookup", "hyper_connections", "hrm_refine", "jepa", "mtp"):
        assert counts[plugin] > 0, plugin


def test_cli_prints_the_breakdown(capsys):
    assert main([str(ROOT / "experiments/escarda_86m.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("total") and "engram" in out
