"""mtp: head k aligned to labels shifted by k; escarda heads equal the main head at init."""

from __future__ import annotations

import pytest
import torch

from escarda_lab.layers import nll_and_logsumexp
from escarda_lab.model import EscardaLM


def mtp_model(tiny_model_cfg, variant, depth=2):
    return EscardaLM(tiny_model_cfg(components={"mtp": {"enabled": True, "variant": variant, "depth": depth}}))


def test_escarda_heads_equal_the_main_head_at_init(tiny_model_cfg):
    model = mtp_model(tiny_model_cfg, "escarda")
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids)
    heads = model.objectives["mtp"].head_logits({"ids": ids, "labels": ids}, out)
    for k, lg in enumerate(heads, start=1):
        assert torch.allclose(lg, out.logits[:, : 10 - k], atol=1e-6)


@pytest.mark.parametrize("variant", ["escarda", "deepseek"])
def test_head_k_is_scored_against_labels_shifted_by_k(tiny_model_cfg, variant):
    model = mtp_model(tiny_model_cfg, variant)
    ids = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    batch = {"ids": ids, "labels": labels}
    out = model(ids)
    mtp = model.objectives["mtp"]
    heads = mtp.head_logits(batch, out)
    expected = torch.stack([nll_and_logsumexp(lg, labels[:, k:])[0].mean() for k, lg in enumerate(heads, 1)]).mean()
    assert torch.allclose(mtp(batch, out), expected, atol=1e-6)
    assert [lg.shape[1] for lg in heads] == [9, 8]


@pytest.mark.parametrize("variant", ["escarda", "deepseek"])
def test_ignored_labels_are_ignored(tiny_model_cfg, variant):
    model = mtp_model(tiny_model_cfg, variant, depth=1)
    ids = torch.randint(0, 97, (1, 8))
    labels = torch.randint(0, 97, (1, 8))
    out = model(ids)
    a = model.objectives["mtp"]({"ids": ids, "labels": labels}, out)
    changed = labels.clone()
    changed[0, 1] = -100  # position 0 of head 1 predicts labels[1]
    b = model.objectives["mtp"]({"ids": ids, "labels": changed}, out)
    heads = model.objectives["mtp"].head_logits({"ids": ids, "labels": labels}, out)
    nll = nll_and_logsumexp(heads[0], labels[:, 1:])[0]
    if variant == "escarda":  # deepseek's head also reads labels as inputs, so only check escarda exactly
        assert torch.allclose(b, nll[0, 1:].mean(), atol=1e-6)
    assert not torch.allclose(a, b)


def test_mtp_does_not_change_generation(tiny_model_cfg):
    from escarda_lab.generate import generate

    torch.manual_seed(0)
    with_mtp = mtp_model(tiny_model_cfg, "deepseek")
    plain = EscardaLM(tiny_model_cfg())
    plain.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("objectives")})
    assert generate(with_mtp, [2, 5], 8, temperature=0.0) == generate(plain, [2, 5], 8, temperature=0.0)
