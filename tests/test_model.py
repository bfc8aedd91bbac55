import numpy as np
import paddle
import pytest

from paddle_mm.config import (
    LMConfig,
    LoraConfig,
    ModelConfig,
    ProjectorConfig,
    QFormerConfig,
    TrainConfig,
    VisionConfig,
)
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.model import VisionLanguageModel, causal_lm_loss, mean_nll, next_token_nll
from paddle_mm.training.optim import apply_trainable

IMG = 5  # image_token_id
VOCAB, HIDDEN = 64, 32
SPECIAL = {"eos": 0, "pad": 0, "bos": 0}


def tiny_config(projector: ProjectorConfig | None = None, image_token_id: int = IMG) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2),
        projector=projector or ProjectorConfig(type="mlp2x_gelu"),
        lm=LMConfig(family="qwen2", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2),
        image_token_id=image_token_id,
    )


def make_model(projector: ProjectorConfig | None = None, seed: int = 0) -> VisionLanguageModel:
    paddle.seed(seed)
    model = VisionLanguageModel(tiny_config(projector), special_ids=SPECIAL)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    return make_model()


def pixels(n: int, seed: int = 1) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype("float32"))


def ids_tensor(rows: list[list[int]]) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(rows, dtype="int64"))


def image_span(n: int = 1, t: int = 16) -> list[int]:
    return [IMG] * (n * t)


def model_loss(model, ids, mask, px, labels):
    """The model's mean next-token loss (its forward with labels returns the per-token terms)."""
    token_nll, logits = model(ids, mask, px, labels)
    assert logits is None  # with labels the model projects only the labelled positions
    return mean_nll(token_nll, labels)


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean next-token cross-entropy over shifted positions whose label is not IGNORE_INDEX."""
    logits, labels = logits[:, :-1].astype("float64"), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    z = logits[keep]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(z)), labels[keep]].mean())


# tokens per image --------------------------------------------------------------------------

def test_tokens_per_image_by_projector():
    assert make_model(ProjectorConfig(type="mlp2x_gelu", pool=1)).tokens_per_image == 16
    pooled = make_model(ProjectorConfig(type="mlp2x_gelu", pool=2))
    assert pooled.tokens_per_image == 4
    assert pooled.image_features(pixels(2)).shape == [2, 4, HIDDEN]
    q = QFormerConfig(num_queries=6, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    qformer = make_model(ProjectorConfig(type="qformer", qformer=q))
    assert qformer.tokens_per_image == 6
    assert qformer.image_features(pixels(3)).shape == [3, 6, HIDDEN]


def test_submodule_names(model):
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"vision_tower", "multi_modal_projector", "language_model"}


# merging image features --------------------------------------------------------------------

def check_embed(model, rows, px):
    input_ids = ids_tensor(rows)
    with paddle.no_grad():
        out = model.embed(input_ids, px).numpy()
        plain = model.language_model.get_input_embeddings()(input_ids).numpy()
        feats = None if px is None else model.image_features(px).numpy().reshape([-1, HIDDEN])
    ids = np.asarray(rows)
    is_image = ids == IMG
    assert out.shape == (len(rows), len(rows[0]), HIDDEN)
    np.testing.assert_array_equal(out[~is_image], plain[~is_image])
    if feats is not None:
        # out[is_image] reads the image positions row-major: the same order as the images
        np.testing.assert_allclose(out[is_image], feats, atol=1e-6)
    return out


def test_embed_text_only_batch(model):
    rows = [[1, 2, 3, 4], [7, 8, 9, 10]]
    check_embed(model, rows, None)


def test_embed_one_image(model):
    rows = [[1, 2] + image_span() + [3, 4]]
    check_embed(model, rows, pixels(1))


def test_embed_three_images_over_two_rows(model):
    # row 0: image A, text, image B; row 1: padding, then image C
    row0 = [1] + image_span() + [2, 3] + image_span() + [4]
    row1 = [0] * 19 + image_span() + [6]
    px = pixels(3)
    out = check_embed(model, [row0, row1], px)
    with paddle.no_grad():
        feats = model.image_features(px).numpy()
    np.testing.assert_allclose(out[0, 1:17], feats[0], atol=1e-6)
    np.testing.assert_allclose(out[0, 19:35], feats[1], atol=1e-6)
    np.testing.assert_allclose(out[1, 19:35], feats[2], atol=1e-6)
    assert not np.allclose(feats[0], feats[1])


def test_image_count_mismatch_raises_with_both_counts(model):
    rows = [[1] + image_span() + [2]]
    with pytest.raises(ValueError) as info:
        model.embed(ids_tensor(rows), pixels(2))
    message = str(info.value)
    assert "16" in message and "32" in message and "2 images" in message
    with pytest.raises(ValueError, match="16 image token positions"):
        model.embed(ids_tensor(rows), None)


# loss ---------------------------------------------------------------------------------------

def test_loss_matches_numpy_cross_entropy_on_unmasked_positions(model):
    rows = [[1, 2] + image_span() + [3, 4, 6, 7], [0, 0] + [8] + image_span() + [9, 10, 11]]
    labels = np.full((2, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 19:] = [4, 6, 7]
    labels[1, 20:] = [10, 11]
    mask = np.ones((2, 22), dtype="int64")
    mask[1, :2] = 0
    with paddle.no_grad():
        loss = model_loss(model, ids_tensor(rows), paddle.to_tensor(mask), pixels(2), paddle.to_tensor(labels))
        _, logits = model(ids_tensor(rows), paddle.to_tensor(mask), pixels(2))
    assert logits.shape == [2, 22, VOCAB]
    expected = numpy_cross_entropy(logits.numpy(), labels)
    assert abs(float(loss) - expected) < 1e-5
    # a mean over all 5 labelled tokens, not a mean of per-row means
    per_row = np.mean([numpy_cross_entropy(logits.numpy()[i:i + 1], labels[i:i + 1]) for i in range(2)])
    assert abs(expected - per_row) > 1e-6


def test_loss_ignores_masked_positions():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, VOCAB)).astype("float32")
    labels = np.array([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6],
                       [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]], dtype="int64")
    base = float(causal_lm_loss(paddle.to_tensor(logits), paddle.to_tensor(labels)))
    # logits that predict masked labels (shifted: positions 0, 1, 5 of row 0 and 0, 3, 4, 5 of row 1)
    changed = logits.copy()
    changed[0, [0, 1, 5]] += 10 * rng.standard_normal((3, VOCAB)).astype("float32")
    changed[1, [0, 3, 4, 5]] += 10 * rng.standard_normal((4, VOCAB)).astype("float32")
    assert abs(float(causal_lm_loss(paddle.to_tensor(changed), paddle.to_tensor(labels))) - base) < 1e-6
    # but a change at a labelled position moves the loss
    changed[0, 2] += 10 * rng.standard_normal(VOCAB).astype("float32")
    assert abs(float(causal_lm_loss(paddle.to_tensor(changed), paddle.to_tensor(labels))) - base) > 1e-3


def test_causal_lm_loss_is_mean_over_labelled_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, VOCAB)).astype("float32")
    labels = np.array([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6],
                       [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]], dtype="int64")
    loss = float(causal_lm_loss(paddle.to_tensor(logits), paddle.to_tensor(labels)))
    assert abs(loss - numpy_cross_entropy(logits, labels)) < 1e-5


def test_model_loss_unchanged_by_right_padding(model):
    rows = [[1, 2] + image_span() + [3, 4, 6, 7]]
    labels = np.full((1, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 18:] = [3, 4, 6, 7]
    padded_rows = [rows[0] + [0] * 6]
    padded_labels = np.concatenate([labels, np.full((1, 6), IGNORE_INDEX, dtype="int64")], axis=1)
    padded_mask = paddle.to_tensor([[1] * 22 + [0] * 6], dtype="int64")
    with paddle.no_grad():
        a = model_loss(model, ids_tensor(rows), None, pixels(1), paddle.to_tensor(labels))
        b = model_loss(model, ids_tensor(padded_rows), padded_mask, pixels(1), paddle.to_tensor(padded_labels))
    assert abs(float(a) - float(b)) < 1e-5


def test_model_loss_unchanged_by_text_after_last_label(model):
    rows = [[1, 2] + image_span() + [3, 4, 6, 7]]
    labels = np.full((1, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 18:20] = [3, 4]
    other = [rows[0][:20] + [30, 31]]  # different tokens only after the labelled span
    with paddle.no_grad():
        a = model_loss(model, ids_tensor(rows), None, pixels(1), paddle.to_tensor(labels))
        b = model_loss(model, ids_tensor(other), None, pixels(1), paddle.to_tensor(labels))
    assert abs(float(a) - float(b)) < 1e-6


# generation ---------------------------------------------------------------------------------

def generation_batch():
    """Two rows with images, row 0 left-padded by 2."""
    row0 = [0, 0, 7, 8] + image_span() + [9, 10]
    row1 = [7] + image_span() + [11, 12, 13, 14, 15]
    mask = [[0, 0] + [1] * 20, [1] * 22]
    return ids_tensor([row0, row1]), paddle.to_tensor(mask, dtype="int64"), pixels(2)


def test_greedy_generation_with_and_without_cache_agree(model):
    ids, mask, px = generation_batch()
    cached = model.generate(ids, mask, px, max_new_tokens=8, use_cache=True)
    uncached = model.generate(ids, mask, px, max_new_tokens=8, use_cache=False)
    assert [len(r) for r in cached] == [8, 8]
    assert cached == uncached


def test_greedy_first_token_is_argmax_of_forward(model):
    ids, mask, px = generation_batch()
    with paddle.no_grad():
        _, logits = model(ids, mask, px)
    first = [r[0] for r in model.generate(ids, mask, px, max_new_tokens=1)]
    assert first == logits[:, -1].argmax(-1).tolist()


def test_left_padded_row_generates_as_if_alone(model):
    ids, mask, px = generation_batch()
    batch = model.generate(ids, mask, px, max_new_tokens=6)
    alone = model.generate(ids[:1, 2:], None, px[:1], max_new_tokens=6)
    assert batch[0] == alone[0]


def test_eos_stops_a_row(model):
    ids, mask, px = generation_batch()
    free = model.generate(ids, mask, px, max_new_tokens=8)
    eos = free[0][0]
    stopped = model.generate(ids, mask, px, max_new_tokens=8, eos_token_id=eos)
    assert stopped[0] == []
    # row 1 runs until its own first eos (or the limit), with the same tokens as before
    expected = free[1][:free[1].index(eos)] if eos in free[1] else free[1]
    assert stopped[1] == expected


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(model):
    ids, mask, px = generation_batch()
    paddle.seed(123)
    first = model.generate(ids, mask, px, max_new_tokens=8, do_sample=True)
    paddle.seed(123)
    second = model.generate(ids, mask, px, max_new_tokens=8, do_sample=True)
    assert first == second
    greedy = model.generate(ids, mask, px, max_new_tokens=8)
    assert first != greedy  # sampling from an untrained model's flat distribution
    paddle.seed(7)
    nucleus = model.generate(ids, mask, px, max_new_tokens=8, do_sample=True, top_p=1e-6)
    assert nucleus == greedy


# gradients by stage ------------------------------------------------------------------------

def train_step(model):
    model.train()
    rows = [[1, 2] + image_span() + [3, 4, 6, 7]]
    labels = np.full((1, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 18:] = [3, 4, 6, 7]
    model_loss(model, ids_tensor(rows), None, pixels(1), paddle.to_tensor(labels)).backward()


def grads(module) -> dict[str, object]:
    return {n: p.grad for n, p in module.named_parameters()}


def test_pretrain_stage_only_projector_gets_grads():
    model = make_model()
    apply_trainable(model, TrainConfig(trainable=["multi_modal_projector"]))
    train_step(model)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads(model.multi_modal_projector).values())
    assert all(g is None for g in grads(model.vision_tower).values())
    assert all(g is None for g in grads(model.language_model).values())


def test_instruct_stage_projector_and_lm_get_grads():
    model = make_model()
    groups = apply_trainable(model, TrainConfig(trainable=["multi_modal_projector", "language_model"]))
    assert set(groups) == {"multi_modal_projector", "language_model"}
    train_step(model)
    assert all(g is not None for g in grads(model.multi_modal_projector).values())
    lm_grads = grads(model.language_model)
    assert all(g is not None for g in lm_grads.values())
    assert float(lm_grads["model.embed_tokens.weight"].abs().sum()) > 0
    assert all(g is None for g in grads(model.vision_tower).values())


def test_lora_only_lora_matrices_and_projector_get_grads():
    model = make_model()
    cfg = TrainConfig(trainable=["multi_modal_projector", "language_model"], lora=LoraConfig(enabled=True, r=4, alpha=8))
    groups = apply_trainable(model, cfg)
    lm_grads = grads(model.language_model)
    lora = {n for n in lm_grads if "lora_A" in n or "lora_B" in n}
    # q/k/v/o of 2 layers, an A and a B each
    assert len(lora) == 2 * 4 * 2
    assert {id(p) for p in groups["language_model"]} == \
        {id(p) for n, p in model.language_model.named_parameters() if n in lora}
    train_step(model)
    lm_grads = grads(model.language_model)
    assert all(lm_grads[n] is not None for n in lora)
    assert any(float(lm_grads[n].abs().sum()) > 0 for n in lora if "lora_B" in n)
    assert all(g is None for n, g in lm_grads.items() if n not in lora)  # base weights frozen
    assert all(g is not None for g in grads(model.multi_modal_projector).values())
    assert all(g is None for g in grads(model.vision_tower).values())


# config checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, VOCAB, VOCAB + 10])
def test_image_token_id_outside_vocab_raises(bad):
    with pytest.raises(ValueError, match="image_token_id"):
        VisionLanguageModel(tiny_config(image_token_id=bad), special_ids=SPECIAL)


def test_causal_lm_loss_is_nan_when_logits_are_nan():
    # Paddle's CPU cross_entropy maps an all-NaN row of >= 64 logits to log(V): a diverged
    # model would train on, logging a constant finite loss.
    logits = np.full([1, 4, 320], np.nan, dtype="float32")
    labels = np.array([[-100, 3, 4, 5]])
    loss = causal_lm_loss(paddle.to_tensor(logits, stop_gradient=False), paddle.to_tensor(labels))
    assert np.isnan(float(loss))


def full_vocabulary_loss(logits, labels):
    """The loss as it was computed before next_token_nll: every position projected, the logits sliced."""
    import paddle.nn.functional as F

    flat = logits[:, :-1].astype("float32").reshape([-1, logits.shape[-1]])
    shift = labels[:, 1:].reshape([-1])
    keep = shift != IGNORE_INDEX
    targets = paddle.where(keep, shift, paddle.zeros_like(shift)).unsqueeze(-1)
    per_token = paddle.where(keep, F.cross_entropy(flat, targets, reduction="none").reshape([-1]),
                             paddle.zeros(shift.shape, dtype="float32"))
    return per_token.sum() / keep.astype("float32").sum()


def test_loss_at_labelled_positions_equals_the_full_vocabulary_loss_and_its_gradients():
    rows = [[1, 2] + image_span() + [3, 4, 6, 7], [0, 0] + [8] + image_span() + [9, 10, 11]]
    labels = np.full((2, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 17:] = [30, 3, 4, 6, 7]
    labels[1, 20:] = [10, 11]
    labels[1, 3] = 12  # a lone label inside the row
    mask = np.ones((2, 22), dtype="int64")
    mask[1, :2] = 0
    args = (ids_tensor(rows), paddle.to_tensor(mask), pixels(2))
    results = []
    for path in ("labelled", "full"):
        model = make_model(seed=3)
        model.train()
        if path == "labelled":
            loss = model_loss(model, *args, paddle.to_tensor(labels))
        else:
            loss = full_vocabulary_loss(model(*args)[1], paddle.to_tensor(labels))
        loss.backward()
        results.append((float(loss), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-6
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        np.testing.assert_allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("bad", [None, np.nan])
def test_the_head_and_loss_in_pieces_give_the_same_terms_and_gradients(monkeypatch, bad):
    """Logits past model.LOGITS_CHUNK_BYTES go through the head a few rows at a time (here two);
    the terms and gradients are those of one piece, and a bad head weight still reaches every term."""
    import paddle_mm.model as model_module

    labels = np.full((2, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 15:] = [30, 3, 4, 6, 7, 8, 9]
    labels[1, 19:] = [10, 11, 12]
    args = (ids_tensor([[1, 2] + image_span() + [3, 4, 6, 7]] * 2), None, pixels(2), paddle.to_tensor(labels))
    results = []
    for chunk_bytes in (model_module.LOGITS_CHUNK_BYTES, 4 * VOCAB * 2):
        monkeypatch.setattr(model_module, "LOGITS_CHUNK_BYTES", chunk_bytes)
        m = make_model(seed=5)
        m.train()
        if bad is not None:
            w = m.language_model.lm_head.weight.numpy()
            w.flat[7] = bad
            m.language_model.lm_head.weight.set_value(w)
        token_nll, _ = m(*args)
        token_nll.sum().backward()
        results.append((token_nll.numpy(), {n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}))
    (whole, grads_whole), (pieces, grads_pieces) = results
    if bad is not None:
        assert np.isnan(pieces[labels != IGNORE_INDEX]).all() and np.isnan(whole[labels != IGNORE_INDEX]).all()
        return
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)
    assert grads_whole.keys() == grads_pieces.keys() and len(grads_whole) > 10
    for name in grads_whole:
        np.testing.assert_allclose(grads_pieces[name], grads_whole[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_next_token_nll_puts_each_term_at_its_label():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, VOCAB)).astype("float32")
    labels = np.array([[IGNORE_INDEX, 4, IGNORE_INDEX, 6, 7], [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8]])
    nll = next_token_nll(paddle.to_tensor(logits), paddle.to_tensor(labels)).numpy()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.zeros((2, 5), dtype="float32")
    for b, j in [(0, 1), (0, 3), (0, 4), (1, 4)]:  # column 0 predicts nothing: its label is no target
        expected[b, j] = -log_p[b, j - 1, labels[b, j]]
    np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)


def test_no_labelled_token_gives_a_zero_loss_with_a_gradient_path(model):
    labels = paddle.full([1, 22], IGNORE_INDEX, dtype="int64")
    m = make_model()
    m.train()
    loss = model_loss(m, ids_tensor([[1, 2] + image_span() + [3, 4, 6, 7]]), None, pixels(1), labels)
    assert float(loss) == 0.0
    loss.backward()  # a batch whose answers were all cut still takes part in the step


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_model_loss_is_not_finite_when_one_head_weight_is_not(bad):
    # Paddle's CPU cross_entropy hides a NaN or inf among a row's logits (a finite loss comes
    # back): a head weight gone bad must still show in the loss.
    m = make_model()
    head = m.language_model.lm_head.weight
    w = head.numpy()
    w.flat[7] = bad
    head.set_value(w)
    labels = np.full((1, 22), IGNORE_INDEX, dtype="int64")
    labels[0, 18:] = [3, 4, 6, 7]
    loss = model_loss(m, ids_tensor([[1, 2] + image_span() + [3, 4, 6, 7]]), None, pixels(1), paddle.to_tensor(labels))
    assert not np.isfinite(float(loss))


def test_features_of_images_with_their_own_token_counts_land_in_reading_order(model):
    """The contract a family whose images differ in token count relies on: flat [sum T_i, D] features."""
    from paddle_mm.model import write_image_features

    rows = [[1] + [IMG] * 3 + [2] + [IMG] * 5, [IMG] * 2 + [3] * 8]
    ids = ids_tensor(rows)
    embeds = model.language_model.get_input_embeddings()(paddle.where(ids == IMG, paddle.zeros_like(ids), ids))
    feats = paddle.to_tensor(np.random.default_rng(0).standard_normal((10, HIDDEN)).astype("float32"))
    out = write_image_features(embeds, ids == IMG, feats, num_images=3).numpy()
    np.testing.assert_allclose(out[0, 1:4], feats.numpy()[0:3], atol=1e-6)
    np.testing.assert_allclose(out[0, 5:10], feats.numpy()[3:8], atol=1e-6)
    np.testing.assert_allclose(out[1, 0:2], feats.numpy()[8:10], atol=1e-6)
    np.testing.assert_allclose(out[1, 2:], embeds.numpy()[1, 2:], atol=1e-6)
    with pytest.raises(ValueError, match="10 image token positions, but 3 images give 9 image features$"):
        write_image_features(embeds, ids == IMG, feats[:9], num_images=3)
