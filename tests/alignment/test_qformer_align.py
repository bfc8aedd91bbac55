"""The Q-Former's text branch and the three stage-1 losses on a tiny model."""
import numpy as np
import paddle
import pytest

from paddle_mm.alignment.losses import attention_mask
from paddle_mm.alignment.qformer import QFormerAligner
from paddle_mm.config import ModelConfig, ProjectorConfig, QFormerConfig, TextConfig, VisionConfig

VOCAB, PAD, DEC = 40, 0, 5


def make_model(seed=0) -> QFormerAligner:
    paddle.seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, hidden_act="gelu", feature_layer=-1, post_norm=True),
        projector=ProjectorConfig(type="qformer", qformer=QFormerConfig(
            num_queries=3, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)),
        text=TextConfig(max_length=8, max_position_embeddings=16, embed_dim=8),
        image_token_id=1,
    )
    cfg.lm.hidden_size = 12
    model = QFormerAligner(cfg, VOCAB, PAD, DEC, seed=0)
    model.eval()
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, VOCAB, (3, 5))
    ids[:, 0] = 2
    mask = np.ones((3, 5), dtype="int64")
    mask[2, 3:] = 0
    pixels = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    return paddle.to_tensor(ids), paddle.to_tensor(mask), paddle.to_tensor(pixels)


def text_and_queries(model, ids, mask, pixels, kind):
    feats = model.vision_tower(pixels)
    return model._joint(feats, ids, mask.numpy().astype(bool), kind)


def test_query_outputs_match_the_projector_path_under_itc_and_itg():
    model = make_model()
    ids, mask, pixels = batch()
    alone = model.multi_modal_projector.query_states(model.vision_tower(pixels)).numpy()
    for kind in ("itc", "itg"):  # queries never read the text: exactly the projector's output
        q, _ = text_and_queries(model, ids, mask, pixels, kind)
        np.testing.assert_allclose(q.numpy(), alone, rtol=1e-5, atol=1e-5)
    q, _ = text_and_queries(model, ids, mask, pixels, "itm")  # here they do read it
    assert np.abs(q.numpy() - alone).max() > 1e-4


def test_itc_text_ignores_the_image_and_padding():
    model = make_model()
    ids, mask, pixels = batch()
    a = model.text_embeddings(ids, mask).numpy()
    _, t1 = text_and_queries(model, ids, mask, pixels, "itc")
    _, t2 = text_and_queries(model, ids, mask, pixels * 3.0 + 1.0, "itc")
    np.testing.assert_allclose(t1.numpy(), t2.numpy(), rtol=1e-5, atol=1e-5)
    ids2 = ids.numpy().copy()
    ids2[2, 3:] = 17  # change what sits in the padding
    b = model.text_embeddings(paddle.to_tensor(ids2), mask).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)


def test_itg_text_position_does_not_see_later_tokens():
    model = make_model()
    ids, mask, pixels = batch()
    _, t1 = text_and_queries(model, ids, mask, pixels, "itg")
    ids2 = ids.numpy().copy()
    ids2[:, 3] = 7
    _, t2 = text_and_queries(model, paddle.to_tensor(ids2), mask, pixels, "itg")
    np.testing.assert_allclose(t1.numpy()[:, :3], t2.numpy()[:, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(t1.numpy()[:2, 3:] - t2.numpy()[:2, 3:]).max() > 1e-4
    # ... while it does see the image, through the queries.
    _, t3 = text_and_queries(model, ids, mask, pixels * 3.0 + 1.0, "itg")
    assert np.abs(t1.numpy()[:, 0] - t3.numpy()[:, 0]).max() > 1e-4


def test_similarity_is_the_best_query():
    model = make_model()
    img = paddle.to_tensor(np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype="float32"))  # 1 image, 2 queries
    txt = paddle.to_tensor(np.array([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]], dtype="float32"))
    np.testing.assert_allclose(model.similarity(img, txt).numpy(), [[0.8, 1.0, 0.0]], atol=1e-6)


def test_three_losses_finite_and_gradients_reach_the_parts_they_train():
    model = make_model()
    model.train()
    ids, mask, pixels = batch()
    loss, parts = model(ids, mask, pixels)
    assert set(parts) == {"itc", "itm", "itg"}
    assert all(np.isfinite(float(v)) for v in parts.values())
    # Chance-level starting points: ITM is 2-way, ITG spreads over the vocabulary.
    assert float(parts["itm"]) == pytest.approx(np.log(2), abs=0.3)
    assert float(parts["itg"]) == pytest.approx(np.log(VOCAB), abs=1.0)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    for name in ("align_heads.temp", "align_heads.itm_head.weight", "align_heads.lm_bias",
                 "text_tower.word_embeddings.weight", "text_tower.layers.1.mlp.fc1.weight",
                 "multi_modal_projector.query_tokens", "multi_modal_projector.layers.0.cross_attn.k_proj.weight",
                 "vision_tower.patch_embedding.weight"):
        assert name in grads, name
    # The language projection is stage 2's: stage 1 leaves it alone.
    assert "multi_modal_projector.proj.weight" not in grads


def test_itg_loss_is_the_decoders_own_next_token_loss():
    """ITG by hand: [DEC] first, logits from the LM head, mean CE over the valid next tokens."""
    model = make_model()
    ids, mask, pixels = batch()
    dec = ids.numpy().copy()
    dec[:, 0] = DEC
    _, text = text_and_queries(model, paddle.to_tensor(dec), mask, pixels, "itg")
    logits = model.lm_logits(text).numpy()
    total, count = 0.0, 0
    for b in range(3):
        for t in range(4):
            if mask.numpy()[b, t + 1]:
                row = logits[b, t] - logits[b, t].max()
                total += -(row[ids.numpy()[b, t + 1]] - np.log(np.exp(row).sum()))
                count += 1
    assert float(model.losses(ids, mask, pixels)["itg"]) == pytest.approx(total / count, rel=1e-4)


def test_query_only_projector_unchanged_by_the_text_branch():
    """The projector's state dict has no text parts: stage 2 loads it as before."""
    sd = make_model().multi_modal_projector.state_dict()
    assert not any("word_embeddings" in k or "text" in k for k in sd)
    assert attention_mask("itc", 3, np.ones((1, 2), bool)).shape == (1, 1, 5, 5)
