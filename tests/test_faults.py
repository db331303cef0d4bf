"""Faults a cluster delivers and mistakes a user makes: each ends in one paragraph with exit code
2 (never a traceback), and nothing written before is lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from escarda_lab import corpora
from escarda_lab.errors import DataError
from escarda_lab.run import main
from escarda_lab.run_folder import verify_checkpoint
from tests.conftest import ROOT, tiny_overrides

VANILLA = str(ROOT / "experiments/vanilla.yaml")


def one_paragraph(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("escarda_lab:")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


# ------------------------------------------------------------------------------------ full disks


def test_a_full_disk_while_checkpointing_loses_nothing_and_the_rerun_resumes(corpus, tmp_path, capsys, monkeypatch):
    import lightning as L

    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 9})
    real = L.Trainer.save_checkpoint
    calls = []

    def full_disk(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 6): the writer fails half-way
            Path(path).write_bytes(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed: file write failed"
            )
        return real(self, path, *a, **k)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_disk)
    assert main([VANILLA, *over]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "output.dir" in msg and "no space left" in msg and "rerun the same command" in msg
    folder = tmp_path / "runs" / "vanilla" / "seed0"
    assert not (folder / ".last.ckpt.tmp").exists()  # no partial file left behind
    verify_checkpoint(folder / "last.ckpt")  # the step-3 checkpoint is intact
    assert json.loads((folder / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(L.Trainer, "save_checkpoint", real)
    assert main([VANILLA, *over]) == 0  # space freed: the rerun resumes and finishes
    assert json.loads((folder / "metrics.json").read_text())["step"] == 9


def can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True)
    return ok.returncode == 0


def test_a_3mb_tmpfs_as_output_dir_gives_one_paragraph_and_a_rerun_after_freeing_succeeds(corpus, tmp_path):
    disk = tmp_path / "tiny"
    if not can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root (the test with a simulated full disk covers the logic)")
    try:
        (disk / "someone_elses_data.bin").write_bytes(b"\0" * (2_900_000))
        over = tiny_overrides(corpus, disk, **{"train.max_steps": 6})
        cmd = [sys.executable, "-m", "escarda_lab.run", VANILLA, *over]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert first.returncode == 2, first.stderr
        assert "no space left" in one_paragraph(first.stderr)
        assert (disk / "someone_elses_data.bin").stat().st_size == 2_900_000
        (disk / "someone_elses_data.bin").unlink()  # free space
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_checkpoints_are_staged_beside_the_run_never_in_tmpdir(corpus, tmp_path, monkeypatch):
    import tempfile

    staged = []  # temp files made outside a folder we chose: $TMPDIR (Lightning's fsspec transaction)
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: staged.append(k.get("dir")) or real(*a, **k))
    assert main([VANILLA, *tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 6})]) == 0
    assert (tmp_path / "runs" / "vanilla" / "seed0" / "last.ckpt").stat().st_size > 0
    assert staged and None not in staged  # every temp file sits beside its target


def test_an_output_dir_that_is_a_file_names_the_key(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([VANILLA, *tiny_overrides(corpus, tmp_path / "afile")]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "output.dir" in msg and "is a file" in msg


# ------------------------------------------------------------------------------------ memory


def test_a_step_that_cannot_fit_in_memory_is_refused_with_the_estimate(corpus, tmp_path, capsys):
    over = tiny_overrides(corpus, tmp_path, **{"data.seq_len": 100_000, "model.max_seq_len": 100_000})
    over += ["data.batch_size=64", "model.d_model=512", "model.n_layers=8"]
    assert main([VANILLA, *over]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "GiB" in msg and "data.seq_len" in msg and not (tmp_path / "vanilla").exists()


def test_the_memory_estimate_grows_with_the_batch_and_is_modest_for_the_demo():
    from escarda_lab import accounting, config

    cfg = config.load(VANILLA, ["model.vocab_size=4096"])
    small = accounting.step_memory_bytes(cfg)
    assert 10 * 2**20 < small < 4 * 2**30  # the demo: tens of MB to a few GB, never refused
    big = accounting.step_memory_bytes(config.load(VANILLA, ["model.vocab_size=4096", "data.batch_size=64"]))
    assert big > 1.5 * small


# --------------------------------------------------------------------------------- text files


def test_a_few_bytes_that_are_not_utf8_are_replaced_and_counted(tmp_path, caplog):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"plain text " * 100 + b"caf\xe9 na\xefve\n")
    caplog.set_level("WARNING")
    text = corpora.read_text(path, "x.yaml")
    assert text.count("\ufffd") == 2 and "2 byte sequence(s) are not UTF-8" in caplog.text


def test_a_binary_file_is_refused_as_not_text(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 200)
    with pytest.raises(DataError) as e:
        corpora.read_text(path, "x.yaml")
    assert e.value.key == "data.corpus" and "not UTF-8 text" in e.value.problem


# ------------------------------------------------------------------- mistakes: one paragraph each


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ('raise RuntimeError("boom")\n', "raised RuntimeError: boom"),
        ("import a_package_nobody_installed\n", "imports 'a_package_nobody_installed', which is not installed"),
        ("x = 1\ndef broken(:\n", ".py at line 2"),  # a SyntaxError names the plugin's file and line
    ],
)
def test_a_plugin_module_that_fails_to_import_names_the_file(plugin_dir, capsys, body, expect):
    name = f"broken_{abs(hash(body)) % 10_000}"
    (plugin_dir / f"{name}.py").write_text(body)
    exp = plugin_dir / "exp.yaml"
    exp.write_text(f"extends: {VANILLA}\nplugins: [{name}]\n")
    assert main([str(exp)]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert expect in msg and "plugins" in msg


def test_a_folder_given_as_the_experiment_says_so(capsys):
    assert main([str(ROOT / "experiments")]) == 2
    assert "is a folder, not an experiment file" in one_paragraph(capsys.readouterr().err)


def test_a_python_object_tag_is_refused_as_such(tmp_path, capsys):
    exp = tmp_path / "evil.yaml"
    exp.write_text('name: !!python/object/apply:os.system ["true"]\n')
    assert main([str(exp)]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "builds a Python object" in msg and "plain values" in msg


def test_an_unnamed_experiment_is_named_after_its_file(tmp_path, capsys):
    exp = tmp_path / "my_idea.yaml"
    exp.write_text("")
    assert main([str(exp), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: my_idea" in out and not (tmp_path / "runs").exists()


def test_a_bad_command_line_corpus_is_credited_to_the_command_line(corpus, tmp_path, capsys):
    over = tiny_overrides(corpus, tmp_path) + [f"data.corpus={tmp_path / 'missing.txt'}"]
    assert main([VANILLA, *over]) == 2
    assert one_paragraph(capsys.readouterr().err).startswith("escarda_lab: error in command line, key `data.corpus`")


# -------------------------------------------------------------------------------- pre-emption


def test_a_requeued_submitit_job_checkpoints_its_child_and_resubmits_the_same_call():
    pytest.importorskip("submitit")
    from escarda_lab.grid.launch import RequeueableRun

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    job = RequeueableRun()
    job.remember(child)  # what run_one tells the job when it starts the training process
    delayed = job.checkpoint("runs/g/full/seed0/config.yaml", 2, [])
    assert child.poll() is not None  # the training process was told to stop (it checkpoints on SIGTERM)
    assert isinstance(delayed.function, RequeueableRun) and delayed.function.child is None
    assert delayed.args == ("runs/g/full/seed0/config.yaml", 2, [])


def test_a_truncated_metrics_json_is_ignored_with_a_warning_and_the_run_resumes(corpus, tmp_path, caplog):
    over = tiny_overrides(corpus, tmp_path)
    assert main([VANILLA, *over]) == 0
    metrics = tmp_path / "vanilla" / "seed0" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    caplog.set_level("WARNING")
    assert main([VANILLA, *over]) == 0  # not trusted as finished: resumed from last.ckpt and scored again
    assert "is damaged" in caplog.text and json.loads(metrics.read_text())["status"] == "finished"


def test_a_full_disk_in_a_background_writer_is_one_line_not_a_thread_traceback(tmp_path, capsys, caplog):
    import errno
    import threading

    from escarda_lab.run import storage_errors_in_threads

    def writer():
        raise OSError(errno.ENOSPC, "No space left on device")

    before = threading.excepthook
    with storage_errors_in_threads(tmp_path):
        t = threading.Thread(target=writer, name="TensorBoard event writer")
        t.start()
        t.join()
    assert "Traceback" not in capsys.readouterr().err
    assert "TensorBoard event writer stopped writing into" in caplog.text and "No space left" in caplog.text
    assert threading.excepthook is before  # put back afterwards


def test_a_resume_on_an_edited_corpus_is_refused_and_the_run_left_as_it_was(corpus, tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(corpus.read_text())
    over = tiny_overrides(src, tmp_path / "runs", **{"train.max_steps": 6})
    assert main([VANILLA, *over]) == 0
    folder = tmp_path / "runs" / "vanilla" / "seed0"
    assert json.loads((folder / "inputs.json").read_text())["corpus"] == str(src)
    (folder / "metrics.json").unlink()  # as if it had stopped before the end: last.ckpt remains
    ckpt = (folder / "last.ckpt").read_bytes()
    src.write_text(src.read_text() + "\n\nA paragraph added after the run started.\n")
    assert main([VANILLA, *over]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "started on other inputs" in msg and "the corpus's tokens" in msg and "data.corpus" in msg
    assert (folder / "last.ckpt").read_bytes() == ckpt  # nothing lost
