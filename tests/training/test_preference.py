"""train.stage dpo: the losses against hand-worked values and PaddleFormers, the pair data, a run."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from paddle_mm.config import DPOConfig
from paddle_mm.data.readers import pair_turns, read_llava_pairs
from paddle_mm.errors import DataError, RecipeError
from paddle_mm.model import next_token_nll
from paddle_mm.training.preference import answer_logps, preference_loss


def _loss_and_grads(cfg: DPOConfig, pc=-1.0, pr=-2.0, rc=-1.5, rr=-1.5):
    import paddle

    policy_c = paddle.to_tensor([pc], stop_gradient=False)
    policy_r = paddle.to_tensor([pr], stop_gradient=False)
    loss, _, _ = preference_loss(policy_c, policy_r, paddle.to_tensor([rc]), paddle.to_tensor([rr]), cfg)
    loss.sum().backward()
    return float(loss), float(policy_c.grad), float(policy_r.grad)


# Log-ratio margin (-1 + 1.5) - (-2 + 1.5) = 1, so h = beta.
@pytest.mark.parametrize("cfg, loss, grad_chosen", [
    # -log sigmoid(0.5) = log(1 + e^-0.5); d/dpc = -beta * (1 - sigmoid(0.5))
    (DPOConfig(beta=0.5), math.log(1 + math.exp(-0.5)), -0.5 * (1 - 1 / (1 + math.exp(-0.5)))),
    # 0.9 * 0.474077 + 0.1 * log(1 + e^0.5); d/dpc = -0.5 * (0.9 * (1 - s) - 0.1 * s), s = sigmoid(0.5)
    (DPOConfig(beta=0.5, label_smoothing=0.1), 0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)),
     -0.5 * (0.9 * (1 - 1 / (1 + math.exp(-0.5))) - 0.1 / (1 + math.exp(-0.5)))),
    # (margin - 1 / (2 beta))^2 = (1 - 2)^2; d/dpc = 2 * (1 - 2)
    (DPOConfig(loss="ipo", beta=0.25), 1.0, -2.0),
    # max(0, 1 - 0.5); d/dpc = -beta
    (DPOConfig(loss="hinge", beta=0.5), 0.5, -0.5),
])
def test_losses_and_gradients_match_hand_worked_values(cfg, loss, grad_chosen):
    got_loss, got_c, got_r = _loss_and_grads(cfg)
    assert got_loss == pytest.approx(loss, rel=1e-5)
    assert got_c == pytest.approx(grad_chosen, rel=1e-5)
    assert got_r == pytest.approx(-grad_chosen, rel=1e-5)  # the loss depends on the margin only


def test_hinge_is_flat_past_its_margin():
    assert _loss_and_grads(DPOConfig(loss="hinge", beta=2.0))[:2] == (0.0, 0.0)  # h = 2 > 1


@pytest.mark.parametrize("cfg", [DPOConfig(beta=0.1), DPOConfig(beta=0.3, label_smoothing=0.2),
                                 DPOConfig(loss="ipo", beta=0.1), DPOConfig(loss="hinge", beta=0.7)])
def test_losses_and_gradients_equal_paddleformers_dpo_criterion_on_the_same_log_probs(cfg):
    """PaddleFormers' DPOCriterion.dpo_loss takes the four log-prob tensors (its forward needs its
    own packed label layout, so the comparison is at the formula, on identical inputs): the same
    batch-mean loss, and the same gradient on the policy's log-probabilities of both answers."""
    import paddle

    criterion_mod = pytest.importorskip("paddleformers.transformers.dpo_criterion")
    from types import SimpleNamespace

    criterion = criterion_mod.DPOCriterion(
        SimpleNamespace(tensor_parallel_output=False, tensor_model_parallel_size=1),
        dpo_config=SimpleNamespace(loss_type=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                   pref_loss_ratio=1.0))
    values = np.random.default_rng(0).uniform(-30, -1, (4, 16)).astype("float32")

    def loss_and_policy_grads(loss_of):
        logps = [paddle.to_tensor(v, stop_gradient=k >= 2) for k, v in enumerate(values)]  # policy: the first two
        loss = loss_of(logps)
        loss.backward()
        return float(loss), logps[0].grad.numpy(), logps[1].grad.numpy()

    ours = loss_and_policy_grads(lambda logps: preference_loss(*logps, cfg)[0].mean())
    theirs = loss_and_policy_grads(lambda logps: criterion.dpo_loss(*logps))
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    for got, want in zip(ours[1:], theirs[1:]):
        assert np.abs(want).max() > 0  # a real gradient to compare, not two zeros
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_answer_logps_sums_or_averages_the_labelled_tokens_only():
    import paddle

    logits = paddle.to_tensor(np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]],
                                               dtype="float32")))
    # Position t's logits predict token t + 1: token 1 from row 0 (p = 0.25), token 2 from row 1
    # (p = 0.1); the last row predicts nothing and the unlabelled first token is never a target.
    labels = paddle.to_tensor(np.array([[-100, 1, 2]]))
    token_nll = next_token_nll(logits, labels)  # what the model returns with labels
    assert float(answer_logps(token_nll, labels)) == pytest.approx(math.log(0.25) + math.log(0.1), rel=1e-5)
    assert float(answer_logps(token_nll, labels, average=True)) == pytest.approx(
        (math.log(0.25) + math.log(0.1)) / 2, rel=1e-5)


# ----------------------------------------------------------------------------- the data
def _pairs_file(tmp_path, records) -> str:
    (tmp_path / "a.png").write_bytes(b"")  # the reader checks paths, not pixels
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    return str(path)


def _pair(**kw):
    rec = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}],
           "chosen": "a red circle", "rejected": "a blue square"}
    return {**rec, **kw}


def test_llava_pairs_reads_one_conversation_with_two_final_answers(tmp_path):
    (sample,) = read_llava_pairs(_pairs_file(tmp_path, [_pair()])).samples
    chosen, rejected = pair_turns(sample)
    assert chosen == [("user", "<image>\nwhat is it?"), ("assistant", "a red circle")]
    assert rejected == [("user", "<image>\nwhat is it?"), ("assistant", "a blue square")]


@pytest.mark.parametrize("record, reason, message", [
    (_pair(rejected="a red circle"), "identical_answers", "same answer"),
    (_pair(image=None, conversations=[{"from": "human", "value": "<image>\nwhat?"}]), "tag_mismatch",
     "1 <image> tags but 0 images"),
    (_pair(conversations=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a red circle"}]),
     "bad_record", "must end with the user turn"),
])
def test_a_bad_pair_names_its_file_record_and_cause(tmp_path, record, reason, message):
    if record.get("image") is None:
        record.pop("image")
    path = _pairs_file(tmp_path, [_pair(), record])
    (err,) = read_llava_pairs(path, on_error="skip").skipped
    assert (err.path, err.record, err.reason) == (path, 1, reason) and message in str(err)


def test_check_data_reports_identical_answers(demo_data, tiny_recipe, tmp_path):
    from paddle_mm.training.check_data import check_data

    pairs = json.load(open(os.path.join(demo_data["data"], "train_llava.json")))[:2]
    records = [{"id": r["id"], "image": r["image"], "conversations": r["conversations"][:1],
                "chosen": "yes", "rejected": "yes" if k else "no"} for k, r in enumerate(pairs)]
    path = os.path.join(demo_data["data"], "check_pairs.json")
    with open(path, "w") as f:
        json.dump(records, f)
    recipe = tiny_recipe(str(tmp_path / "run"), "train.stage=dpo",
                         f"data.train=[{{path: {path}, format: llava_pairs}}]")
    report = check_data(recipe, decode_images=False)
    assert (report["records"], report["usable"]) == (2, 1)
    (example,) = report["by_reason"]["identical_answers"]["examples"]
    assert (example["path"], example["record"]) == (path, 1)


# ----------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def start_and_pairs(demo_data, tmp_path_factory):
    """A 2-step instruct run to start from, and the bundled pairs of the train scenes."""
    from tiny import make_tiny_recipe

    from paddle_mm.eval.hallucination import write_preference_pairs
    from paddle_mm.training.loop import train

    start = train(make_tiny_recipe(demo_data, str(tmp_path_factory.mktemp("sft") / "run"), "train.max_steps=2"),
                  quiet=True)
    return start, write_preference_pairs(demo_data["data"], "train")


LORA = ["train.trainable=[multi_modal_projector, language_model]", "train.lora.enabled=true",
        "train.lora.r=2", "train.lora.alpha=4"]


@pytest.mark.parametrize("variant, first_loss", [
    ([], math.log(2)),  # sigmoid: -log sigmoid(0)
    (LORA, math.log(2)),
    (["train.dpo.loss=ipo"], 1.0),  # (0 - 1 / (2 * 0.5))^2
    (["train.dpo.loss=hinge"], 1.0),  # max(0, 1 - 0)
], ids=["full", "lora", "ipo", "hinge"])
def test_dpo_starts_at_its_reference_and_logs_the_preference_figures(tiny_recipe, tmp_path, start_and_pairs,
                                                                     variant, first_loss):
    """At step 1 the policy is the frozen start, so every reward is 0 and the loss is the variant's
    value at a zero margin: the reference log-probabilities are the start's (full or LoRA).
    Later steps move the policy away from it (a few steps on new batches each need not have
    opened the margin yet: that is the experiment's, tools/dpo_experiment.py)."""
    from paddle_mm.training.loop import train

    start, pairs = start_and_pairs
    run = train(tiny_recipe(str(tmp_path / "dpo"), "train.stage=dpo", f"train.init_from={start}",
                            f"data.train=[{{path: {pairs}, format: llava_pairs}}]", "train.max_steps=4",
                            "train.lr=1e-2", "train.schedule=constant", "train.dpo.beta=0.5", *variant), quiet=True)
    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    first = log[0]
    assert first["step_loss"] == pytest.approx(first_loss, abs=1e-4)
    # Zero up to float noise (the reference was scored in other batches, other padding), so
    # reward_accuracy, the share of margins > 0, is noise here and not checked.
    for key in ("reward_margin", "chosen_reward", "rejected_reward"):
        assert first[key] == pytest.approx(0.0, abs=1e-4), key
    assert first["chosen_logp"] < 0 and first["rejected_logp"] < 0
    assert abs(log[-1]["chosen_reward"]) > 1e-4 and abs(log[-1]["rejected_reward"]) > 1e-4


def test_sft_weight_adds_the_chosen_answers_next_token_loss(tiny_recipe, tmp_path, start_and_pairs):
    from paddle_mm.training.loop import train

    start, pairs = start_and_pairs
    common = ["train.stage=dpo", f"train.init_from={start}", f"data.train=[{{path: {pairs}, format: llava_pairs}}]",
              "train.max_steps=1"]
    plain = train(tiny_recipe(str(tmp_path / "a"), *common), quiet=True)
    mixed = train(tiny_recipe(str(tmp_path / "b"), *common, "train.dpo.sft_weight=1"), quiet=True)
    (p,), (m,) = ([json.loads(line) for line in open(os.path.join(r, "metrics.jsonl"))] for r in (plain, mixed))
    assert p["step_loss"] == pytest.approx(math.log(2), abs=1e-4)
    # The chosen rows' mean next-token loss lies between 0 and the per-pair summed NLL.
    assert 0 < m["step_loss"] - p["step_loss"] < -m["chosen_logp"]


def test_dpo_validates_on_held_out_pairs_scored_by_the_same_reference(tiny_recipe, tmp_path, start_and_pairs):
    """data.eval pairs get their reference log-probabilities from the start too: before any step
    the held-out sigmoid loss is exactly log 2 (eval_every=1 evaluates after step 1, so a tiny lr
    keeps the policy at the reference)."""
    from paddle_mm.training.loop import train

    start, pairs = start_and_pairs
    run = train(tiny_recipe(str(tmp_path / "v"), "train.stage=dpo", f"train.init_from={start}",
                            f"data.train=[{{path: {pairs}, format: llava_pairs}}]",
                            f"data.eval=[{{path: {pairs}, format: llava_pairs}}]", "train.eval_every=1",
                            "train.eval_samples=8", "train.max_steps=1", "train.lr=1e-12"), quiet=True)
    (record,) = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert record["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_two_processes_log_the_figures_of_the_whole_global_batch(tiny_recipe, tmp_path, start_and_pairs):
    """Each process sees half of each global batch; the logged figures are summed over both
    (an all-reduce), so they equal one process's over the whole batch."""
    from paddle_mm.training.launch import train_in_processes
    from paddle_mm.training.loop import train

    start, pairs = start_and_pairs
    common = ["train.stage=dpo", f"train.init_from={start}", f"data.train=[{{path: {pairs}, format: llava_pairs}}]",
              "train.max_steps=2", "train.lr=1e-2", "train.num_threads=1"]
    one = train(tiny_recipe(str(tmp_path / "one"), *common), quiet=True)
    two = train_in_processes(tiny_recipe(str(tmp_path / "two"), *common), processes=2, quiet=True)
    logs = [[json.loads(line) for line in open(os.path.join(r, "metrics.jsonl"))] for r in (one, two)]
    for a, b in zip(*logs):
        # At step 1 the margins are float noise around 0, and so is the share of them above 0.
        keys = ("step_loss", "reward_margin", "chosen_logp", "rejected_logp") + (("reward_accuracy",) * (a["step"] > 1))
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key)


def test_dpo_refuses_a_run_without_its_start_or_with_conversation_data(tiny_recipe, tmp_path):
    from paddle_mm.training.loop import train

    with pytest.raises(RecipeError, match="train.init_from must name the instruct run"):
        train(tiny_recipe(str(tmp_path / "a"), "train.stage=dpo"), quiet=True)
    with pytest.raises(RecipeError, match="not 'llava_pairs'"):
        train(tiny_recipe(str(tmp_path / "b"), "train.stage=dpo", f"train.init_from={tmp_path}"), quiet=True)


def test_pair_turns_refuses_a_plain_conversation():
    from paddle_mm.data.readers import Sample

    with pytest.raises(DataError, match="not a preference pair"):
        pair_turns(Sample("x", [], [("user", "q"), ("assistant", "a")], "f.json", 3))


def test_bundled_pairs_reject_an_answer_naming_an_absent_object(demo_data):
    """Chosen: the scene's own caption, or the right yes/no about an object; rejected: a caption
    naming one object the scene lacks (one of its own renamed: wholly, or in its shape or its colour
    alone; or one added; every_shape: each object in turn given a shape the scene lacks in its
    colour), or the wrong yes/no.
    Checked with CHAIR's mention matcher."""
    from paddle_mm.data.synthetic import COLOURS, SHAPES
    from paddle_mm.eval.hallucination import CAPTION_EDITS, SCENE_VOCABULARY, write_preference_pairs
    from paddle_mm.eval.metrics.chair import mentioned_objects

    scenes = {s["image"]: s for s in json.load(open(os.path.join(demo_data["data"], "train_scenes.json")))}
    samples = read_llava_pairs(write_preference_pairs(demo_data["data"], "train", caption_edits=CAPTION_EDITS)).samples
    kinds = {}
    for sample in samples:
        rec = scenes[os.path.relpath(sample.images[0], demo_data["data"])]
        held = {f"{o['colour']} {o['shape']}" for o in rec["objects"]}
        chosen, rejected = sample.turns[-1][1], sample.meta["rejected"]
        kind = sample.id.split("-caption-")[1].split("-")[0] if "-caption-" in sample.id else "presence"
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "presence":
            (asked,) = mentioned_objects(sample.turns[0][1], SCENE_VOCABULARY)
            assert (chosen, rejected) == (("yes", "no") if asked in held else ("no", "yes"))
            continue
        assert set(mentioned_objects(chosen, SCENE_VOCABULARY)) == held
        named = set(mentioned_objects(rejected, SCENE_VOCABULARY))
        assert len(named - held) == 1, sample.id
        if kind == "add":  # every object of the scene still there, and one more
            assert held < named and rejected.count(" a ") + 1 == chosen.count(" a ") + 2, sample.id
        else:  # one object renamed: in its colour and shape (swap), or in that one word alone
            changed = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
            assert len(chosen.split()) == len(rejected.split()) and 1 <= len(changed) <= 2, sample.id
            if kind != "swap":
                ((was, now),) = changed
                assert {was, now} <= set(COLOURS if kind == "colour" else SHAPES), sample.id
            if kind == "every_shape":  # the object the id names is the one changed
                index = int(sample.id.rsplit("-", 1)[1])
                words = chosen.replace(",", "").split()
                assert [i for i, w in enumerate(words) if w in SHAPES][index] == \
                    [i for i, (a, b) in enumerate(zip(words, rejected.replace(",", "").split())) if a != b][0]
    objects = sum(len(s["objects"]) for s in scenes.values())
    assert kinds == {"swap": len(scenes), "shape": len(scenes), "colour": len(scenes), "add": len(scenes),
                     "every_shape": objects, "presence": kinds["presence"]}


def test_bundled_presence_pairs_prefer_yes_and_no_equally_on_every_scene(demo_data):
    """As many pairs prefer "yes" (a present object) as prefer "no" (an absent one), per scene and
    so overall: pairs that mostly prefer one answer teach the model that answer. The absent
    objects are POPE's adversarial ones (co-occurring with the scene's), counted on the train
    scenes: the same questions pope_questions draws for them."""
    from collections import Counter

    from paddle_mm.eval.hallucination import SCENE_QUESTION, write_preference_pairs
    from paddle_mm.eval.metrics.pope import pope_questions

    train = json.load(open(os.path.join(demo_data["data"], "train_scenes.json")))
    samples = read_llava_pairs(write_preference_pairs(demo_data["data"], "train", presence_per_image=2,
                                                      caption_edits=())).samples
    chosen = Counter((os.path.relpath(s.images[0], demo_data["data"]), s.turns[-1][1]) for s in samples)
    for rec in train:
        n = min(2, len({(o["colour"], o["shape"]) for o in rec["objects"]}))
        assert chosen[rec["image"], "yes"] == chosen[rec["image"], "no"] == n, rec["image"]
    expected = pope_questions([(r["image"], [f"{o['colour']} {o['shape']}" for o in r["objects"]]) for r in train],
                              "adversarial", 2, 0, SCENE_QUESTION)
    assert [(s.turns[0][1].split("\n")[1], s.turns[-1][1]) for s in samples] == [(q["text"], q["label"])
                                                                                 for q in expected]


def test_bundled_pairs_read_only_their_split_and_refuse_the_test_scenes(demo_data, tmp_path):
    """The pairs of the train split are the same with the other splits' files gone: nothing of the
    held-out scenes (not even their object counts) reaches the training pairs."""
    import shutil

    from paddle_mm.eval.hallucination import write_preference_pairs

    alone = tmp_path / "train_only"
    alone.mkdir()
    shutil.copy(os.path.join(demo_data["data"], "train_scenes.json"), alone)
    with open(write_preference_pairs(demo_data["data"], "train")) as f:
        full = json.load(f)
    with open(write_preference_pairs(str(alone), "train")) as f:
        assert json.load(f) == full
    with pytest.raises(ValueError, match="held-out"):
        write_preference_pairs(demo_data["data"], "test")


def test_a_models_own_hallucinated_caption_becomes_a_rejected_one(demo_data):
    """model_captions: a caption naming an object its scene lacks is rejected against the true one;
    a caption that names only the scene's objects (if wrongly placed) makes no pair."""
    from paddle_mm.eval.hallucination import write_preference_pairs

    first, second = json.load(open(os.path.join(demo_data["data"], "train_scenes.json")))[:2]
    held = {(o["colour"], o["shape"]) for o in second["objects"]}
    colour, shape = next((c, s) for c in ("red", "green", "blue") for s in ("circle", "square") if (c, s) not in held)
    own = {first["image_id"]: first["caption"].replace(" at the ", " near the "),
           second["image_id"]: f"a {colour} {shape} at the top"}
    with open(write_preference_pairs(demo_data["data"], "train", presence_per_image=0, caption_edits=(),
                                     model_captions=own)) as f:
        (pair,) = json.load(f)
    assert pair["id"] == f"{second['image_id']}-caption-model"
    assert (pair["chosen"], pair["rejected"]) == (second["caption"], own[second["image_id"]])


def test_a_models_caption_mended_names_the_objects_it_meant():
    """corrected_caption, hand-worked: a wrong shape keeps its cell's object, a wrong cell finds the
    object of that colour and shape, an object of a colour the scene lacks (or one already taken)
    is dropped, and the result is listed row-major; an unparsed part or nothing left gives None."""
    from paddle_mm.eval.hallucination import corrected_caption

    def obj(colour, shape, row, col, position):
        return {"colour": colour, "shape": shape, "row": row, "col": col, "position": position}

    scene = {"objects": [obj("red", "square", 0, 0, "top left"), obj("blue", "circle", 1, 1, "center"),
                         obj("green", "triangle", 2, 1, "bottom")]}
    own = ("a green triangle at the top, a red circle at the top left, a yellow square at the right "
           "and a red square at the left")
    assert corrected_caption(own, scene) == "a red square at the top left and a green triangle at the bottom"
    assert corrected_caption("a blue square at the right", scene) == "a blue circle in the center"
    assert corrected_caption("a yellow circle at the top", scene) is None
    assert corrected_caption("a red square near the top left", scene) is None


def test_model_corrections_add_the_mended_caption_as_a_chosen_one(demo_data):
    """model_corrections: a hallucinating caption is also rejected against itself mended, unless the
    mended caption is the true one (that pair is already there)."""
    from paddle_mm.data.synthetic import SHAPES
    from paddle_mm.eval.hallucination import write_preference_pairs

    scenes = json.load(open(os.path.join(demo_data["data"], "train_scenes.json")))
    many, one = (next(s for s in scenes if (len(s["objects"]) > 1) == wanted) for wanted in (True, False))
    own = {}
    for scene in (many, one):
        first, held = scene["objects"][0], {(o["colour"], o["shape"]) for o in scene["objects"]}
        wrong = next(s for s in SHAPES if (first["colour"], s) not in held)
        own[scene["image_id"]] = scene["caption"].split(", ")[0].split(" and ")[0].replace(first["shape"], wrong)
    with open(write_preference_pairs(demo_data["data"], "train", presence_per_image=0, caption_edits=(),
                                     model_captions=own, model_corrections=True)) as f:
        pairs = {p["id"]: (p["chosen"], p["rejected"]) for p in json.load(f)}
    first = many["objects"][0]
    place = "in the center" if first["position"] == "center" else f"at the {first['position']}"
    assert pairs == {f"{many['image_id']}-caption-model": (many["caption"], own[many["image_id"]]),
                     f"{many['image_id']}-caption-mended": (f"a {first['colour']} {first['shape']} {place}",
                                                            own[many["image_id"]]),
                     f"{one['image_id']}-caption-model": (one["caption"], own[one["image_id"]])}
