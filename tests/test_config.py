"""Config: extends, overrides, struct mode, and clear errors for user mistakes (exit code 2)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from escarda_lab import config
from escarda_lab.errors import ConfigError
from escarda_lab.run import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_merges_parent_then_child(tmp_path):
    write(tmp_path, "base.yaml", "model: {d_model: 64, n_layers: 3}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nmodel: {n_layers: 5}\n")
    cfg = config.load(child)
    assert (cfg.model.d_model, cfg.model.n_layers) == (64, 5)


def test_overrides_beat_files(tmp_path):
    child = write(tmp_path, "c.yaml", "train: {max_steps: 100}\n")
    cfg = config.load(child, ["train.max_steps=50", "model.d_model=96"])
    assert cfg.train.max_steps == 50 and cfg.model.d_model == 96


def test_schema_defaults_fill_missing_keys(tmp_path):
    cfg = config.load(write(tmp_path, "e.yaml", "name: x\n"))
    assert cfg.model.rope_style == "half" and cfg.components.z_loss.enabled is False


def test_scientific_floats_parse(tmp_path):
    cfg = config.load(write(tmp_path, "e.yaml", "train: {lr: 1e-4}\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_escarda_extends_vanilla_and_enables_z_loss():
    cfg = config.load(ROOT / "experiments/escarda.yaml")
    assert cfg.name == "escarda" and cfg.components.z_loss.enabled
    assert cfg.model.d_model == config.load(ROOT / "experiments/vanilla.yaml").model.d_model


def test_yaml_round_trip(tmp_path):
    cfg = config.load(ROOT / "experiments/escarda.yaml")
    path = write(tmp_path, "resolved.yaml", config.to_yaml(cfg))
    assert config.load(path) == cfg


# ------------------------------------------------------------------------------ user mistakes
MISTAKES = [
    # (file text, overrides, words the message must contain)
    ("model: {d_modle: 64}\n", [], ["model.d_modle", "did you mean `model.d_model`"]),
    ("components: {engramm: {enabled: true}}\n", [], ["components.engramm", "unknown component"]),
    ("tran: {max_steps: 5}\n", [], ["`tran`", "did you mean `train`"]),
    ("model: {d_model: big}\n", [], ["model.d_model", "wrong type"]),
    ("model: {head_dim: 16, rope_dim: 32}\n", [], ["model.rope_dim", "head_dim"]),
    ("model: {rope_dim: 7}\n", [], ["model.rope_dim", "odd"]),
    ("model: {n_heads: 4, n_kv_heads: 3}\n", [], ["model.n_kv_heads", "multiple"]),
    ("data: {seq_len: 512}\nmodel: {max_seq_len: 256}\n", [], ["data.seq_len", "max_seq_len"]),
    ("data: {tokenizer: {kind: wordpiece}}\n", [], ["data.tokenizer.kind", "bpe"]),
    ("train: {precision: fp8}\n", [], ["train.precision", "32-true"]),
    ("train: {schedule: cosin}\n", [], ["train.schedule", "cosine"]),
    ("train: {max_steps: 10, warmup_steps: 50}\n", [], ["train.warmup_steps", "max_steps"]),
    ("train: {lr: -1.0}\n", [], ["train.lr", "must be > 0"]),
    ("seed: -1\n", [], ["`seed`", "must be >= 0"]),
    ("data: {val_fraction: 1.5}\n", [], ["data.val_fraction", "< 1"]),
    ("components: {mla: {enabled: true, variant: bogus}}\n", [], ["components.mla.variant", "deepseek"]),
    ("model: {rope_style: zigzag}\n", [], ["model.rope_style", "interleaved"]),
    ("model: [1, 2\n", [], ["invalid YAML", "line"]),
    ("extends: missing_parent.yaml\n", [], ["missing_parent.yaml", "does not exist"]),
    ("name: x\n", ["train.max_steps"], ["command line", "key=value"]),
    ("name: x\n", ["model.d_modl=3"], ["command line", "did you mean `model.d_model`"]),
    ("plugins: [no_such_module_xyz]\n", [], ["plugins", "no_such_module_xyz"]),
    ("data: {corpus: /nonexistent/dir/*.txt}\n", ["train.max_steps=60"], ["data.corpus", "/nonexistent"]),
    ("components: {z_loss: {enabled: true, weight: -1.0}}\n", [], ["components.z_loss.weight", ">= 0"]),
]


@pytest.mark.parametrize("text,overrides,words", MISTAKES, ids=[m[2][0] for m in MISTAKES])
def test_mistake_gives_one_paragraph_and_exit_2(tmp_path, capsys, text, overrides, words):
    path = write(tmp_path, "bad.yaml", text)
    code = main([str(path), *overrides, f"output.dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "Fix:" in err
    for w in words:
        assert w in err.replace("\n", " "), f"{w!r} not in {err!r}"


def test_mistake_names_the_file_that_set_the_key(tmp_path):
    write(tmp_path, "parent.yaml", "model: {rope_dim: 9}\n")
    child = write(tmp_path, "child.yaml", "extends: parent.yaml\nname: c\n")
    with pytest.raises(ConfigError) as e:
        config.load(child)
    assert e.value.source.endswith("parent.yaml") and e.value.key == "model.rope_dim"


def test_missing_experiment_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


def test_train_compile_takes_a_torch_compile_mode():
    from escarda_lab.module import resolve_runtime

    cfg = config.load(ROOT / "experiments/vanilla.yaml", ["train.compile=reduce-overhead"])
    assert resolve_runtime(cfg).train.compile == "reduce-overhead"
    with pytest.raises(ConfigError) as e:
        config.load(ROOT / "experiments/vanilla.yaml", ["train.compile=fast"])
    assert e.value.key == "train.compile" and "max-autotune-no-cudagraphs" in e.value.fix


def test_a_yaml_file_that_is_only_a_string_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "words.yaml"
    path.write_text("just some words " * 20 + "\n")
    with pytest.raises(ConfigError, match="holds a YAML str, not a mapping") as e:
        config.load(path)
    assert "just some words just" not in str(e.value)


@pytest.mark.parametrize("key, shown", [("null", "null"), ("yes", "true"), ("3", "3")])
def test_a_key_yaml_reads_as_null_boolean_or_number_is_named_with_the_fix(tmp_path, key, shown):
    path = tmp_path / "g.yaml"
    path.write_text(f"extends: {ROOT}/experiments/vanilla.yaml\ngrid:\n  variants:\n    {key}: {{model.d_model: 64}}\n")
    with pytest.raises(ConfigError) as e:
        config.read_grid(path)
    assert e.value.key == "grid.variants" and f"`{shown}`" in str(e.value) and f'quote it ("{shown}"' in e.value.fix


@pytest.mark.parametrize("override", ["seed=4294967296", "data_seed=-1", "name=" + "n" * 300])
def test_out_of_range_seeds_and_overlong_names_are_refused_before_any_folder(override, tmp_path, capsys):
    assert main([str(ROOT / "experiments/vanilla.yaml"), f"output.dir={tmp_path}", override]) == 2
    assert "Traceback" not in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_options_may_come_between_the_file_and_its_overrides(capsys):
    assert main([str(ROOT / "experiments/vanilla.yaml"), "--dry-run", "train.max_steps=77"]) == 0
    assert "max_steps: 77" in capsys.readouterr().out
