"""A Qwen2-VL built from scratch (model.family qwen2_vl) through the normal paths: the dataset's
per-image token counts and grids, pretraining the merger, LoRA instruct with packing, check-data,
and answers from the run folder (batched, blanked, several images, the server's length check)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from tiny import TINY_QWEN2_VL

from paddle_mm import builder

SIZES = [(48, 48), (112, 56), (56, 140), (150, 60)]


@pytest.fixture(scope="module")
def sized_images(demo_data, tmp_path_factory):
    """Demo scenes resized to four sizes: each gives its own grid and token count."""
    root = tmp_path_factory.mktemp("sizes")
    scenes = sorted((p for p in (demo_data["root"] / "data" / "images" / "train").iterdir()))
    out = []
    for k, (w, h) in enumerate(SIZES):
        path = root / f"{k}.png"
        Image.open(scenes[k]).resize((w, h)).save(path)
        out.append(str(path))
    return out


def _recipe(tiny_recipe, out_dir, *overrides, stage="instruct"):
    return tiny_recipe(str(out_dir), *TINY_QWEN2_VL, *overrides, stage=stage)


def test_a_batch_of_images_of_several_sizes_holds_only_their_own_patches(tiny_recipe, tmp_path, sized_images):
    from paddle_mm.data.dataset import ConversationDataset, collate
    from paddle_mm.data.qwen2_vl import Qwen2VLProcessor

    recipe = _recipe(tiny_recipe, tmp_path / "x")
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    base = samples[0]
    made = [replace(base, id="two", images=sized_images[:2],
                    turns=[("user", "<image>\n<image>\nwhich is wider?"), ("assistant", "the first")]),
            replace(base, id="one", images=sized_images[2:3],
                    turns=[("user", "<image>\nhow many circles?"), ("assistant", "two")]),
            replace(base, id="none", images=[], turns=[("user", "hello"), ("assistant", "hi")])]
    tok = builder.load_tokenizer(recipe)
    processor = builder.image_processor_for(recipe)
    assert isinstance(processor, Qwen2VLProcessor)
    cfg = builder.model_config_for(recipe, tok)
    assert builder.fixed_image_tokens(cfg) is None
    data = ConversationDataset(made, tok, processor, None, 2048)
    items = [data[i] for i in range(len(data))]
    counts = processor.image_token_counts(sized_images[:3])
    # width x height 48x48 -> 56x56 (4 x 4 patches, 4 tokens); 112x56 -> 8 x 4 (8); 56x140 -> 4 x 10 (10)
    assert counts == [4, 8, 10]
    for item, own in zip(items, ([4, 8], [10], [])):
        assert int((item["input_ids"] == tok.image_token_id).sum()) == sum(own)
        if own:  # the header's counts are what decoding gives
            assert processor.token_counts(item["image_grid_thw"]) == own
    batch = collate(items, tok.pad_token_id)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 10, 4]]  # (t, rows, columns)
    assert batch["pixel_values"].shape == (16 + 32 + 40, 3 * 2 * 14 * 14)  # each image its own rows, no padding


def test_pretrain_the_merger_then_lora_instruct_packed_and_answer_from_the_run(tiny_recipe, tmp_path, sized_images):
    import paddle

    from paddle_mm.data.readers import Sample
    from paddle_mm.inference.generate import generate_answers, prompt_length
    from paddle_mm.run_folder import load_run
    from paddle_mm.training.loop import train
    from paddle_mm.weights.tensor_files import load_tensors

    pretrain = _recipe(tiny_recipe, tmp_path / "pretrain", "train.max_steps=2", "train.trainable=[multi_modal_projector]",
                       "train.lr=0.01", stage="pretrain")
    run = train(pretrain, quiet=True)
    tok = builder.load_tokenizer(pretrain)
    paddle.seed(pretrain.train.seed)
    start = {k: v.numpy() for k, v in builder.build_model(builder.model_config_for(pretrain, tok), tok)
             .state_dict().items()}
    trained = load_tensors(f"{run}/model.safetensors")
    changed = {k.split(".")[0] for k in trained if not np.array_equal(np.asarray(trained[k]), start[k])}
    assert changed == {"multi_modal_projector"}  # the encoder and the LM stay as they started

    instruct = _recipe(tiny_recipe, tmp_path / "instruct", "train.max_steps=2", f"train.init_from={run}",
                       "train.lora.enabled=true", "data.packing=true", "data.pack_length=512")
    run = train(instruct, quiet=True)
    lines = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert lines and all(np.isfinite(x["loss"]) for x in lines if "loss" in x)

    recipe, _, tok, model = load_run(run)
    processor = builder.image_processor_for(recipe)
    samples = [Sample(id="a", images=sized_images[:2], turns=[("user", "<image>\n<image>\nwhich has more circles?")],
                      source="t", index=0),
               Sample(id="b", images=sized_images[3:], turns=[("user", "<image>\nwhat colour is the circle?")],
                      source="t", index=1)]
    greedy = replace(recipe.infer, max_new_tokens=6, batch_size=2)
    together = generate_answers(model, tok, samples, processor, greedy)
    alone = {s.id: generate_answers(model, tok, [s], processor, replace(greedy, batch_size=1))[s.id] for s in samples}
    assert together == alone  # left padding and concatenated grids: each row decodes as alone
    blind = generate_answers(model, tok, samples, processor, greedy, blind=True)
    assert set(blind) == {"a", "b"}
    # the server's length check: the question, the template, and 4 + 8 image tokens
    ids, _ = tok.encode_chat(samples[0].turns, [4, 8], add_generation_prompt=True)
    assert prompt_length(model, tok, processor, samples[0]) == len(ids)


def test_check_data_counts_each_images_own_tokens_and_names_a_bad_record(tiny_recipe, tmp_path, sized_images):
    from paddle_mm.training.check_data import check_data

    records = [{"id": "ok", "image": sized_images[:2],
                "conversations": [{"from": "human", "value": "<image>\n<image>\nwhich is wider?"},
                                  {"from": "gpt", "value": "the first"}]},
               {"id": "long", "image": sized_images[2],
                "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a"}]},
               {"id": "gone", "image": str(tmp_path / "missing.png"),
                "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "b"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    # 56x140 gives 10 tokens: with the ChatML frame that record no longer fits 30 tokens
    recipe = _recipe(tiny_recipe, tmp_path / "x", f"data.train=[{{path: {tmp_path / 'd.json'}, format: llava}}]",
                     "data.max_length=34", "data.allow_outside_root=true")
    report = check_data(recipe)
    assert report["records"] == 3 and report["usable"] == 1, report
    reasons = report["by_reason"]
    assert set(reasons) == {"too_long", "image_missing"}, reasons
