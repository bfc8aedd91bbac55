"""Crash safety and exact resume: real SIGKILLs of a training process, checkpoint folders, logs."""
from __future__ import annotations

import json
import os
import random

import kill_harness as kh
import numpy as np
import pytest

from paddle_mm.errors import CheckpointError
from paddle_mm.training import checkpoints as resume
from paddle_mm.training.loop import train
from paddle_mm.weights.tensor_files import load_tensors


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """The uninterrupted run of the kill tests' recipe (in this process)."""
    from tiny import make_tiny_recipe

    run = train(make_tiny_recipe(demo_data, str(tmp_path_factory.mktemp("ref") / "run"), *kh.RESUME_RECIPE),
                quiet=True)
    return run, kh.logged(run), load_tensors(os.path.join(run, "model.safetensors"))


def test_sigkilled_run_resumes_to_the_same_losses_and_weights(demo_data, reference, tmp_path):
    """Eight real SIGKILLs: one at each point of a save, two at random times, one before the end."""
    _, ref_log, ref_weights = reference
    run_dir = str(tmp_path / "run")
    command = kh.train_command(demo_data, run_dir)
    rng = random.Random(6)
    kills = ["save-started:2", "save-model-written:1", "save-files-written:2", "save-renamed:1",
             "save-pruning:1", "random", "random", "export-started:1"]
    for kill in kills:
        start = kh.check_checkpoints_complete(run_dir)
        kept = kh.log_lines(run_dir)[:start]  # steps 1..start, logged before that checkpoint
        if kill == "random":
            step, delay = kh.random_kill(rng, 40, start)
            code, err = kh.run_with_stderr(command, kill_at_step=step, delay_steps=delay)
        else:
            code, err = kh.run_with_stderr(command, crash_at=kill)
        assert code == -9, f"{kill}: the run was not killed"
        _assert_resumed_from(run_dir, start, kept, err)
        kh.check_checkpoints_complete(run_dir)  # whatever the moment, every folder there is whole
    assert not os.path.exists(os.path.join(run_dir, "model.safetensors"))  # killed before the export
    kept = kh.log_lines(run_dir)
    assert len(kept) == 40 and kh.check_checkpoints_complete(run_dir) == 40
    code, err = kh.run_with_stderr(command)
    assert code == 0 and "finished from checkpoint" in err  # completes the run from its final checkpoint,
    assert "resuming" not in err and kh.log_lines(run_dir) == kept  # training nothing again
    assert kh.logged(run_dir) == ref_log  # every step's loss and learning rate, exactly
    weights = load_tensors(os.path.join(run_dir, "model.safetensors"))
    for name, value in ref_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert [os.path.basename(c) for c in resume.checkpoints(run_dir)] == ["step-00000036", "step-00000040"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoint"))) == ["step-00000036", "step-00000040"]


def _assert_resumed_from(run_dir: str, start: int, kept: list[str], err: str) -> None:
    """The run took up at its newest checkpoint: it says so, and the log lines of the steps
    before it are the earlier attempt's, byte for byte (each holds its measured throughput: a
    run that started over, reaching the same losses, would have rewritten them)."""
    assert len(kept) == start
    if start:
        ckpt = os.path.join(run_dir, "checkpoint", f"step-{start:08d}")
        assert f"resuming from checkpoint {ckpt} at step {start}\n" in err, err[-2000:]
    else:
        assert "resuming" not in err
    assert kh.log_lines(run_dir)[:start] == kept


def test_stopped_and_resumed_in_process_matches_exactly(tiny_recipe, reference, tmp_path, monkeypatch, capsys):
    """The same check without subprocesses: stop right after the step-8 checkpoint, resume."""
    _, ref_log, ref_weights = reference
    run_dir = str(tmp_path / "run")
    save = resume.save_checkpoint

    def save_then_stop(run, *a, **k):
        path = save(run, *a, **k)
        if path.endswith("step-00000008"):
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(resume, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(run_dir, *kh.RESUME_RECIPE), quiet=True)
    monkeypatch.setattr(resume, "save_checkpoint", save)
    kept = kh.log_lines(run_dir)
    assert len(kept) == 8
    capsys.readouterr()
    train(tiny_recipe(run_dir, *kh.RESUME_RECIPE), quiet=True)
    err = capsys.readouterr().err
    assert f"resuming from checkpoint {os.path.join(run_dir, 'checkpoint', 'step-00000008')} at step 8\n" in err
    assert kh.log_lines(run_dir)[:8] == kept  # steps 1-8 not trained again
    assert kh.logged(run_dir) == ref_log
    weights = load_tensors(os.path.join(run_dir, "model.safetensors"))
    assert all(np.array_equal(weights[n], v) for n, v in ref_weights.items())
    with pytest.raises(CheckpointError, match="already trained 40 of max_steps 40"):
        train(tiny_recipe(run_dir, *kh.RESUME_RECIPE), quiet=True)


def test_run_weights_are_the_final_checkpoint_not_a_second_copy(reference):
    run, _, _ = reference
    final = resume.checkpoints(run)[-1]
    assert os.path.samefile(os.path.join(run, "model.safetensors"), os.path.join(final, "model.safetensors"))
    assert resume.read_state(final)["step"] == 40


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path, tiny_recipe):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(reference[0], run)
    newest = resume.checkpoints(run)[-1]
    os.unlink(os.path.join(newest, "model.safetensors"))  # the weights are links: don't write through
    with open(os.path.join(newest, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 10)  # what a power cut after the rename could leave
    from paddle_mm import builder
    from paddle_mm.training.optim import apply_trainable, build_optimizer

    recipe = tiny_recipe(run, *kh.RESUME_RECIPE)
    tok = builder.load_tokenizer(recipe)
    model = builder.build_model(builder.model_config_for(recipe, tok), tok)
    optimizer = build_optimizer(apply_trainable(model, recipe.train), recipe.train)
    state, ckpt = resume.load_latest(run, model, optimizer)
    assert state["step"] == 36 and ckpt.endswith("step-00000036")


def test_leftover_temporary_and_trash_folders_are_removed(tmp_path):
    root = tmp_path / "checkpoint"
    for name in (".tmp-step-00000008-123", ".trash-step-00000004-99", "step-00000004"):
        (root / name).mkdir(parents=True)
    resume.clean_leftovers(str(tmp_path))
    assert sorted(os.listdir(root)) == ["step-00000004"]


def test_trim_log_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)] + [json.dumps({"note": "x"})]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    resume.trim_log(str(log), 2)
    assert log.read_text() == "\n".join([lines[0], lines[1], lines[4]]) + "\n"
    resume.trim_log(str(log), 2)  # nothing more to drop: unchanged
    assert log.read_text().count("\n") == 3


def test_random_states_round_trip_through_json():
    import paddle

    snap = resume.snapshot_rng()
    a = (random.random(), np.random.rand(), paddle.rand([3]).numpy())
    resume.restore_rng(json.loads(json.dumps(resume.rng_to_json(snap))))
    b = (random.random(), np.random.rand(), paddle.rand([3]).numpy())
    assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
