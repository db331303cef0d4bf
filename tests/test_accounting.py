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


def tiny_model(max_seq_len: int):
    from escarda_lab.model import EscardaLM
    from escarda_lab.objectives import total_loss

    over = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=64"]
    over += [f"model.max_seq_len={max_seq_len}", f"data.seq_len={max_seq_len}"]
    cfg = config.load(ROOT / "experiments/escarda.yaml", over)
    model = EscardaLM(cfg)
    return model, lambda b: total_loss(model, b, model(b["ids"]))[0]


def test_flops_beyond_the_probe_length_are_extrapolated_exactly_enough(monkeypatch):
    from escarda_lab import accounting

    model, loss = tiny_model(2048)
    counted = accounting._counted_flops_per_token(model, loss, 2048)
    monkeypatch.setattr(accounting, "PROBE_TOKENS", 512)
    extrapolated = accounting.train_flops_per_token(model, loss, 2048)
    assert abs(extrapolated / counted - 1) < 0.01


def test_a_100k_token_config_is_costed_without_running_a_100k_step():
    from escarda_lab import accounting

    model, loss = tiny_model(100_000)
    seen = []
    per_token = accounting.train_flops_per_token(model, lambda b: seen.append(b["ids"].shape[1]) or loss(b), 100_000)
    assert max(seen) <= accounting.PROBE_TOKENS and per_token > accounting.train_flops_per_token(model, loss, 1024)
