"""Interop: Hugging Face export round-trip and the lm-eval adapter (optional extras, installed by make)."""

from __future__ import annotations

import json

import pytest
import torch

from escarda_lab import minimal_pairs as mp
from escarda_lab.tokenizer import ByteTokenizer
from tests.conftest import ROOT, tiny_overrides

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny Escarda run (every released plugin on) with a BPE tokenizer."""
    from escarda_lab.run import main

    out = tmp_path_factory.mktemp("export") / "runs"
    over = tiny_overrides(corpus, out, **{"data.tokenizer.kind": "bpe", "data.tokenizer.vocab_size": 512})
    assert main([str(ROOT / "experiments/escarda.yaml"), *over]) == 0
    return out / "escarda" / "seed0"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from escarda_lab.export import main

    out = tmp_path_factory.mktemp("hf") / "escarda"
    assert main([str(run), str(out)]) == 0
    return out


TEXT = "The king speaks of the war; the queen walks, héllo."


def test_export_folder_holds_what_transformers_needs(exported):
    names = {p.name for p in exported.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "modeling_escarda.py",
    } <= names
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_escarda.EscardaForCausalLM"


def test_exported_files_are_readable_by_everyone(exported):
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in exported.iterdir())


def test_the_chat_template_gives_the_chatml_ids_generate_uses(run, exported):
    from transformers import PreTrainedTokenizerFast

    from escarda_lab.generate import chatml
    from escarda_lab.run_folder import load_run

    _, tok, _ = load_run(run)
    hf = PreTrainedTokenizerFast.from_pretrained(str(exported))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>" + chatml(messages)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == [tok.bos_id] + tok.encode(chatml(messages))


def test_transformers_logits_equal_ours(run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from escarda_lab.run_folder import load_run

    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    ours, our_tok, _ = load_run(run)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [our_tok.bos_id] + our_tok.encode(TEXT)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_the_exported_model_has_the_runs_parameters_with_the_head_still_tied(run, exported):
    from transformers import AutoModelForCausalLM

    from escarda_lab.run_folder import load_run

    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    ours, _, _ = load_run(run)
    assert hf.num_parameters() == sum(p.numel() for p in ours.parameters())
    assert hf.model.head.weight is hf.model.embed.weight


def test_cached_generation_feeds_one_token_a_step_and_equals_the_full_forward(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True).eval()
    ids = AutoTokenizer.from_pretrained(str(exported)).encode(TEXT, return_tensors="pt")
    fed, forward = [], hf.model.forward
    hf.model.forward = lambda x, cache=None: fed.append(x.shape[1]) or forward(x, cache=cache)
    out = hf.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf.model.forward = forward
    assert fed == [ids.shape[1]] + [1] * 5  # the prompt once, then only the new token
    with torch.no_grad():
        full = hf(out.sequences).logits[0, ids.shape[1] - 1 : -1]
    assert torch.allclose(torch.cat(out.logits), full, atol=1e-5, rtol=0)
    uncached = hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert uncached.tolist() == out.sequences.tolist()


def test_pipeline_generates_text(exported):
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(exported), trust_remote_code=True)
    out = gen("The king", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("The king") and len(out) > len("The king")


def test_byte_tokenizer_exports_to_the_same_ids():
    from escarda_lab.export import hf_tokenizer

    ours = ByteTokenizer()
    hf = hf_tokenizer(ours)
    assert hf.encode(TEXT).ids == [ours.bos_id] + ours.encode(TEXT)
    assert hf.decode(hf.encode(TEXT).ids, skip_special_tokens=True) == TEXT


def test_export_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from escarda_lab.export import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- lm-eval


def test_the_shipped_lm_eval_task_matches_our_scorer(run, monkeypatch):
    """examples/lm_eval/minimal_pairs.yaml, the README's example, run as the README says."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from escarda_lab.lm_eval_adapter import EscardaEvalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # data_files is relative to the repository root
    lines = (ROOT / "examples/lm_eval/minimal_pairs.jsonl").read_text().splitlines()
    pairs = [mp.Pair(d["paradigm"], d["good"], d["bad"], 0) for d in map(json.loads, lines)]
    lm = EscardaEvalLM(str(run), batch_size=8)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["escarda_minimal_pairs"], task_manager=TaskManager(include_path=str(ROOT / "examples/lm_eval"))
    )
    theirs = res["results"]["escarda_minimal_pairs"]["acc,none"]
    assert theirs == pytest.approx(mp.score(lm.scorer, pairs)["overall"]["acc"], abs=1e-12)


def test_lm_eval_generate_until_stops_at_the_until_string(run):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from escarda_lab.lm_eval_adapter import EscardaEvalLM

    lm = EscardaEvalLM(str(run))
    (full,) = lm.generate_until([SimpleNamespace(args=("The king", {"until": [], "max_gen_toks": 12}))])
    assert len(full) > 2  # greedy, so the same text comes back below
    stop = full[len(full) // 2]
    (cut,) = lm.generate_until([SimpleNamespace(args=("The king", {"until": [stop], "max_gen_toks": 12}))])
    assert cut == full.split(stop)[0]
    rolled = lm.loglikelihood_rolling([SimpleNamespace(args=("The king speaks.",))])
    assert rolled[0] < 0
