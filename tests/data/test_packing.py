"""Packing several samples into one row gives each sample the loss it has alone."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_mm.data.packing import pack, plan_rows
from paddle_mm.errors import RecipeError


def test_plan_puts_every_sample_in_one_row_within_the_length():
    lengths = [90, 40, 35, 70, 20, 100, 5, 60]
    rows = plan_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) == 4  # 420 tokens need at least 4 rows of 128
    with pytest.raises(ValueError, match="200 tokens does not fit a packed row of 128"):
        plan_rows([200], 128)


def test_packed_rows_restart_positions_and_confine_attention():
    items = [{"id": i, "input_ids": np.arange(n) + 10, "labels": np.arange(n) + 10, "pixel_values": None}
             for i, n in enumerate([3, 2, 4])]
    batch = pack(items, pad_token_id=0, pack_length=6)
    # longest first: row 0 = sample 2 (4 tokens) + sample 1 (2), row 1 = sample 0 (3) + padding
    np.testing.assert_array_equal(batch["position_ids"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attn_mask_startend_row_indices"][:, 0, :, 0],
                                  [[4, 4, 4, 4, 6, 6], [3, 3, 3, 6, 6, 6]])
    assert batch["labels"][0, 0] == batch["labels"][0, 4] == -100  # no target across a sample boundary
    assert batch["ids"] == [2, 1, 0]


def _per_token_losses(logits, labels):
    import paddle
    import paddle.nn.functional as F

    ce = F.cross_entropy(paddle.to_tensor(logits[:, :-1]), paddle.to_tensor(labels[:, 1:, None]),
                         ignore_index=-100, reduction="none")
    return ce.numpy()[..., 0]


def _packed_and_alone_losses(recipe, samples):
    """Each sample's loss alone (a batch of one) and packed with the others into shared rows."""
    import paddle

    from paddle_mm import builder
    from paddle_mm.data.dataset import ConversationDataset, collate
    from paddle_mm.runtime import seed_everything
    from paddle_mm.training.batches import batch_inputs

    tok = builder.load_tokenizer(recipe)
    cfg = builder.model_config_for(recipe, tok)
    seed_everything(0)
    model = builder.build_model(cfg, tok)
    model.eval()
    # as NextTokenObjective builds it: a Qwen2-VL's items carry their grids and M-RoPE positions
    data = ConversationDataset(samples, tok, builder.image_processor_for(recipe), builder.fixed_image_tokens(cfg),
                               2048, rope_tokens=model.rope_tokens() if hasattr(model, "rope_tokens") else None)
    items = [data[i] for i in range(len(data))]

    def sample_loss(per_token, labels):
        keep = labels[1:] != -100
        return per_token[keep].sum() / keep.sum()

    alone = []
    for x in items:
        b = collate([x], tok.pad_token_id)
        _, logits = model(**batch_inputs(b))
        alone.append(sample_loss(_per_token_losses(logits.numpy(), b["labels"])[0], b["labels"][0]))

    lengths = [len(x["input_ids"]) for x in items]
    pack_length = sorted(lengths)[-1] + sorted(lengths)[-2]
    batch = pack(items, tok.pad_token_id, pack_length)
    assert batch["input_ids"].shape[0] < len(items)  # samples really share rows
    with paddle.no_grad():
        _, logits = model(**batch_inputs(batch))
    per_token = _per_token_losses(logits.numpy(), batch["labels"])
    packed = {}
    for row, members in enumerate(plan_rows(lengths, pack_length)):
        start = 0
        for i in members:
            span = slice(start, start + lengths[i])
            packed[i] = sample_loss(np.append(per_token[row], 0.0)[span][:-1], batch["labels"][row, span])
            start += lengths[i]
    return [packed[i] for i in range(len(items))], alone


def test_per_sample_losses_of_packed_and_padded_batches_are_equal(tiny_recipe, tmp_path):
    from paddle_mm import builder

    recipe = tiny_recipe(str(tmp_path / "x"))
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    picked = samples[:3] + samples[-3:]  # conversations and captions: uneven lengths, all with images
    packed, alone = _packed_and_alone_losses(recipe, picked)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def _multi_image_samples(base, images):
    """Five conversations of 0 to 3 of `images`, their tags in different places."""
    from dataclasses import replace

    made = []
    for k, (n, question) in enumerate([(2, "<image>\n<image>\nwhich image has more circles?"),
                                       (0, "what colour is the circle?"),
                                       (3, "<image> then <image>\nand <image>: is the red square in all?"),
                                       (1, "<image>\nhow many shapes are there?"),
                                       (2, "first <image>, second <image>")]):
        made.append(replace(base, id=f"multi-{k}", images=images[k: k + n],
                            turns=[("user", question), ("assistant", "yes"), ("user", "and?"), ("assistant", "no")]))
    return made


def test_per_sample_losses_with_several_images_per_sample_are_the_same_packed(tiny_recipe, tmp_path):
    """Samples of 0 to 3 images, tags in different places: packed rows hold images of several
    samples, and each image's features must still land on its own sample's positions."""
    from dataclasses import replace

    from paddle_mm import builder

    recipe = tiny_recipe(str(tmp_path / "x"))
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    images = sorted({p for s in samples for p in s.images})[:6]
    made = _multi_image_samples(samples[0], images)
    packed, alone = _packed_and_alone_losses(recipe, made)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    # Swapping a two-image sample's images changes its loss: the features follow their own tags.
    swapped = replace(made[0], images=made[0].images[::-1])
    _, alone_swapped = _packed_and_alone_losses(recipe, [swapped] + made[1:])
    assert abs(alone_swapped[0] - alone[0]) > 1e-6


def test_qwen2_vl_per_sample_losses_with_images_of_several_sizes_are_the_same_packed(tiny_recipe, tmp_path):
    """A Qwen2-VL (images at their own size, M-RoPE positions): packed rows carry each sample's own
    rope_index positions and the images' grids in packed order; 0 to 3 images per sample, of
    four sizes (each its own token count)."""
    from dataclasses import replace

    from PIL import Image
    from tiny import TINY_QWEN2_VL

    from paddle_mm import builder

    recipe = tiny_recipe(str(tmp_path / "x"), *TINY_QWEN2_VL)
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    scenes = sorted({p for s in samples for p in s.images})[:6]
    images = []
    for k, (w, h) in enumerate([(48, 48), (112, 56), (56, 140), (84, 84), (150, 60), (48, 48)]):
        images.append(str(tmp_path / f"{k}.png"))
        Image.open(scenes[k]).resize((w, h)).save(images[-1])
    made = _multi_image_samples(samples[0], images)
    packed, alone = _packed_and_alone_losses(recipe, made)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    swapped = replace(made[0], images=made[0].images[::-1])  # two sizes: the grids follow their own tags
    _, alone_swapped = _packed_and_alone_losses(recipe, [swapped] + made[1:])
    assert abs(alone_swapped[0] - alone[0]) > 1e-6


def test_a_packed_run_trains_and_rejects_rows_shorter_than_max_length(tiny_recipe, tmp_path):
    import json
    import os

    from paddle_mm.training.loop import train

    run = train(tiny_recipe(str(tmp_path / "p"), "train.max_steps=2", "data.packing=true"), quiet=True)
    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    with pytest.raises(RecipeError, match="pack_length 64 is shorter than data.max_length 256"):
        train(tiny_recipe(str(tmp_path / "q"), "data.packing=true", "data.pack_length=64"), quiet=True)
