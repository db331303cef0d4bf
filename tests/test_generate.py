"""Generation: sampling rules, ChatML, cache vs no cache, stop ids, the CLI on a trained run."""

from __future__ import annotations

import pytest
import torch

from escarda_lab.generate import chatml, generate, main, sample
from escarda_lab.model import EscardaLM
from escarda_lab.run import main as run_main
from tests.conftest import tiny_overrides


def test_chatml_format():
    text = chatml([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chatml([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_temperature_zero_and_top_k_1_are_greedy():
    logits = torch.randn(50)
    best = int(logits.argmax())
    assert sample(logits, 0.0) == best and sample(logits, 1.0, top_k=1) == best


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_p=0.75, generator=g) for _ in range(300)}
    assert draws == {0, 1}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(100)
    a = [sample(logits, 1.0, generator=torch.Generator().manual_seed(3)) for _ in range(5)]
    b = [sample(logits, 1.0, generator=torch.Generator().manual_seed(3)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize(
    "comps", [{}, {"mla": {"enabled": True, "variant": "deepseek", "kv_lora_rank": 8}, "xsa": {"enabled": True}}]
)
def test_cached_and_uncached_greedy_generation_agree(tiny_model_cfg, comps):
    model = EscardaLM(tiny_model_cfg(components=comps))
    a = generate(model, [2, 5, 7], 20, temperature=0.0)
    b = generate(model, [2, 5, 7], 20, temperature=0.0, use_cache=False)
    assert a == b and len(a) == 20


def test_generation_stops_at_a_stop_id_and_at_the_context_end(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg())
    first = generate(model, [2, 5], 5, temperature=0.0)
    assert generate(model, [2, 5], 5, temperature=0.0, stop_ids=(first[0],)) == []
    assert len(generate(model, [2] * 30, 50, temperature=0.0)) == 32 - 30


def test_cli_generates_from_a_run_folder(corpus, tmp_path, capsys):
    assert run_main(["experiments/escarda.yaml", *tiny_overrides(corpus, tmp_path)]) == 0
    capsys.readouterr()
    folder = tmp_path / "escarda" / "seed0"
    assert main([str(folder), "--prompt", "The king", "--max-new-tokens", "10", "--chat"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_cli_rejects_a_folder_without_a_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "run folder" in capsys.readouterr().err
