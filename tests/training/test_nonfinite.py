"""A non-finite loss stops the run (saving what is needed to look into it) or skips the batch;
data-parallel ranks stay in step when one of them has nothing readable to train on."""
from __future__ import annotations

import json
import os

import kill_harness as kh
import numpy as np
import pytest

from paddle_mm import run_folder
from paddle_mm.training import checkpoints as resume
from paddle_mm.training.loop import train
from paddle_mm.weights.tensor_files import load_tensors


def _poison(monkeypatch, bad_id: str) -> None:
    """NaN pixels for one sample: its batches get a NaN loss, as corrupt input data would give."""
    from paddle_mm.data.dataset import ConversationDataset

    get = ConversationDataset.__getitem__

    def getitem(self, i):
        item = get(self, i)
        if item["id"] == bad_id:
            item = dict(item, pixel_values=np.full_like(item["pixel_values"], np.nan))
        return item

    monkeypatch.setattr(ConversationDataset, "__getitem__", getitem)


def test_nonfinite_loss_stops_naming_step_and_samples_and_saves_the_state_before(tiny_recipe, tmp_path,
                                                                                 monkeypatch):
    from paddle_mm.errors import NonFiniteLossError

    _poison(monkeypatch, "train-00007")
    run = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step \d+, samples \[.*'train-00007'") as e:
        # a checkpoint after every step, all kept: one is the state right before the bad step
        train(tiny_recipe(run, "train.max_steps=30", "train.save_every=1", "train.keep_checkpoints=30"), quiet=True)
    folders = os.listdir(os.path.join(run, "nonfinite"))
    assert len(folders) == 1 and folders[0] in str(e.value)
    inspect = os.path.join(run, "nonfinite", folders[0])
    batch = json.load(open(os.path.join(inspect, "batch.json")))
    assert batch["loss"] == "nan" and "train-00007" in [s["id"] for s in batch["samples"]]
    assert all(s["source"].endswith(".json") and isinstance(s["record"], int) for s in batch["samples"])
    state = resume.read_state(inspect)
    assert state["step"] == batch["step"] - 1 and "rng" in state  # the state the bad step started from
    # The weights saved are those before the bad step: the regular checkpoint of that step's.
    ckpts = {resume.read_state(c)["step"]: c for c in resume.checkpoints(run)}
    assert state["step"] >= 1 and sorted(ckpts) == list(range(1, state["step"] + 1))  # no step after the bad one
    before = load_tensors(os.path.join(ckpts[state["step"]], "model.safetensors"))
    saved = load_tensors(os.path.join(inspect, "model.safetensors"))
    assert before.keys() == saved.keys()
    for name in before:
        np.testing.assert_array_equal(saved[name], before[name], err_msg=name)
    assert all(np.isfinite(v).all() for v in saved.values())


def test_nonfinite_loss_with_skip_drops_the_batch_and_finishes(tiny_recipe, tmp_path, monkeypatch):
    _poison(monkeypatch, "train-00007")
    run = train(tiny_recipe(str(tmp_path / "run"), "train.max_steps=12", "train.on_nonfinite=skip"), quiet=True)
    log = kh.logged(run)
    assert [s for s, _, _ in log] == list(range(1, 13)) and all(np.isfinite(loss) for _, loss, _ in log)
    skipped = [json.loads(line) for line in open(os.path.join(run, run_folder.NONFINITE_LOG))]
    assert skipped and all("train-00007" in [s["id"] for s in r["samples"]] for r in skipped)
    weights = load_tensors(os.path.join(run, "model.safetensors"))
    assert all(np.isfinite(v).all() for v in weights.values())


def test_data_parallel_ranks_stay_in_step_when_one_ranks_items_are_all_skipped(tiny_recipe, demo_data, tmp_path):
    """batch 2 over 2 processes: the rank whose one sample has a broken image has nothing to
    train on, yet must join the gradient all-reduce (before, it skipped it and the run hung)."""
    import shutil

    from paddle_mm.training.launch import train_in_processes

    data = tmp_path / "data"
    shutil.copytree(demo_data["data"], data)
    for name in ("00001.png", "00002.png", "00005.png"):
        (data / "images" / "train" / name).write_bytes(b"not a png")
    spec = f"data.train=[{{path: {data}/train_llava.json, format: llava}}]"
    run = train_in_processes(tiny_recipe(str(tmp_path / "dp"), spec, "train.max_steps=12", "train.batch_size=2",
                                         "data.on_error=skip"), processes=2, quiet=True)
    assert [s for s, _, _ in kh.logged(run)] == list(range(1, 13))
    assert json.load(open(os.path.join(run, "skipped.json")))["count"] >= 1
