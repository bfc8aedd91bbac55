"""paddle_mm beside Hugging Face transformers (PyTorch, CPU) on one fixed configuration.

Run by hand (needs the optional extras: pip install -r requirements-bench.txt):

    python benchmarks/bench_reference.py [--threads N] [--quick] [--rounds R]

Configuration: ViT and LM hidden 256, 4 layers each, 224 px images, patch 14 (256 image
tokens), Qwen2 LM with vocabulary 32000, mlp2x_gelu projector, batch 2, random weights.
Each side runs in its own process (both frameworks bundle MKL/OpenMP; one process each keeps
them from sharing threads): paddle_mm with its CPU defaults, paddle_mm with Paddle's own
defaults (one thread, MKL's generic path), and LlavaForConditionalGeneration (CLIP vision +
Qwen2 text). Prints a markdown table with paddle_mm / PyTorch ratios (>1: paddle_mm better).
With --rounds R the three sides run R times, taking turns, and each figure is the median of its
R runs: on a shared machine a slow spell then hits every side alike (one run of PyTorch's step
measured anywhere from 407 to 571 ms on the same idle VM).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, LAYERS, HEADS, FFN_VIT, FFN_LM, VOCAB, IMAGE, PATCH = 256, 4, 4, 1024, 688, 32000, 224, 14
IMAGE_TOKENS = (IMAGE // PATCH) ** 2
IMAGE_ID = VOCAB - 1
BATCH, TEXT_TOKENS, NEW_TOKENS, PROMPT_TEXT = 2, 65, 32, 9


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_inputs(rng):
    """A batch of rows: 256 image tokens then text; labels on the text (the answer)."""
    ids = rng.integers(0, IMAGE_ID - 1, size=(BATCH, IMAGE_TOKENS + TEXT_TOKENS))
    ids[:, 1: 1 + IMAGE_TOKENS] = IMAGE_ID
    labels = ids.copy()
    labels[:, : 1 + IMAGE_TOKENS] = -100
    pixels = rng.standard_normal((BATCH, 3, IMAGE, IMAGE)).astype("float32")
    return ids, labels, pixels


def _prompt(rng, b: int):
    ids = rng.integers(0, IMAGE_ID - 1, size=(b, 1 + IMAGE_TOKENS + PROMPT_TEXT - 1))
    ids[:, 1: 1 + IMAGE_TOKENS] = IMAGE_ID
    return ids, rng.standard_normal((b, 3, IMAGE, IMAGE)).astype("float32")


def mixed_lengths(rng, n: int) -> list[int]:
    """Conversation lengths as instruction data has them: mostly short, a long tail."""
    short = rng.integers(24, 96, size=n)
    long = rng.integers(200, 480, size=n)
    return [int(x) for x in np.where(rng.random(n) < 0.25, long, short)]


# ---- the paddle_mm side ----------------------------------------------------------------------
def paddle_model():
    """The benchmark's model on the paddle_mm side, from seed 0 (also what benchmarks/profile_step.py profiles)."""
    import paddle

    from paddle_mm.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from paddle_mm.model import VisionLanguageModel

    paddle.seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, intermediate_size=FFN_VIT,
                            num_layers=LAYERS, num_heads=HEADS, feature_layer=-1),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=LMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN_LM, num_layers=LAYERS,
                    num_heads=HEADS, num_kv_heads=HEADS),
        image_token_id=IMAGE_ID,
    )
    return VisionLanguageModel(cfg, {"eos": 0, "pad": 0, "bos": 0})


def run_paddle(args) -> dict:
    if args.raw:
        # Paddle's own defaults: one OpenMP thread (set on import) and no MKL CPU-type hint.
        os.environ["MKL_DEBUG_CPU_TYPE"] = ""
    import paddle

    from paddle_mm.data.packing import pack
    from paddle_mm.model import mean_nll
    from paddle_mm.runtime import configure_cpu, copying_views
    from paddle_mm.training.batches import batch_inputs

    if not args.raw:
        configure_cpu(args.threads)
    model = paddle_model()
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    rng = np.random.default_rng(0)
    out = {}

    ids, labels, pixels = _train_inputs(rng)
    t_ids, t_labels, t_pix = paddle.to_tensor(ids), paddle.to_tensor(labels), paddle.to_tensor(pixels)
    mask = paddle.ones_like(t_ids)

    @copying_views()  # as the training loop runs a step
    def step():
        token_nll, _ = model(t_ids, mask, t_pix, t_labels)
        mean_nll(token_nll, t_labels).backward()  # the mean over labelled tokens, as the PyTorch side's
        opt.step()
        opt.clear_grad()

    model.train()
    out["train_step_ms"] = 1000 * _median_time(step, args.repeats)
    out["peak_rss_train_mb"] = _peak_rss_mb()

    model.eval()
    for b in (1, 4):
        p_ids, p_pix = _prompt(rng, b)
        t = _median_time(lambda: model.generate(paddle.to_tensor(p_ids), None, paddle.to_tensor(p_pix),
                                                max_new_tokens=NEW_TOKENS, eos_token_id=None), args.gen_repeats)
        out[f"gen_b{b}_tok_s"] = b * NEW_TOKENS / t

    # packed vs padded: the same samples, LM only, forward + backward + optimizer
    lm_opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.language_model.parameters())
    model.train()
    lengths = mixed_lengths(np.random.default_rng(1), args.pack_samples)
    items = [{"id": i, "input_ids": rng.integers(0, IMAGE_ID - 1, size=n), "labels": rng.integers(0, IMAGE_ID - 1, size=n),
              "pixel_values": None} for i, n in enumerate(lengths)]
    from paddle_mm.data.dataset import collate

    padded = [collate(items[i: i + 4], 0) for i in range(0, len(items), 4)]
    packed = [pack(items, 0, 1024)]

    @copying_views()
    def epoch(batches):
        for batch in batches:
            labels = paddle.to_tensor(batch["labels"])
            token_nll, _ = model(**batch_inputs(batch), labels=labels)
            mean_nll(token_nll, labels).backward()
            lm_opt.step()
            lm_opt.clear_grad()

    real = sum(lengths)
    out["padded_tok_s"] = real / _median_time(lambda: epoch(padded), 1)
    out["packed_tok_s"] = real / _median_time(lambda: epoch(packed), 1)
    out["padded_fill"] = real / sum(b["input_ids"].size for b in padded)
    out["packed_fill"] = real / sum(b["input_ids"].size for b in packed)

    if not args.raw:
        out["pipeline_samples_s"] = paddle_pipeline(args)
    return out


def _write_images_and_conversations(folder: str, n: int) -> str:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(2)
    records = []
    for i in range(n):
        img = Image.new("RGB", (400, 300), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, 350), rng.integers(0, 250)
            draw.ellipse([x, y, x + 50, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(os.path.join(folder, f"{i}.png"))
        words = " ".join(rng.choice(["red", "circle", "left", "two", "blue", "square", "top", "one"], size=20))
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in the picture? {words}"},
            {"from": "gpt", "value": f"There is {words}."}]})
    path = os.path.join(folder, "data.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def paddle_pipeline(args) -> float:
    """Samples/s from files: read the records, tokenize, decode + resize images, collate pairs."""
    from paddle_mm.data.dataset import ConversationDataset, collate
    from paddle_mm.data.image import ImageProcessor, ImageProcessorConfig
    from paddle_mm.data.readers import read_dataset
    from paddle_mm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)

    def run():
        samples = read_dataset(args.data, "llava").samples
        data = ConversationDataset(samples, tok, ImageProcessor(ImageProcessorConfig(size=IMAGE)), IMAGE_TOKENS, 4096)
        for i in range(0, len(data), BATCH):
            collate([data[j] for j in range(i, min(i + BATCH, len(data)))], tok.pad_token_id)

    return args.pipeline_samples / _median_time(run, 3)


# ---- the PyTorch side --------------------------------------------------------------------------
def run_torch(args) -> dict:
    try:
        import torch
        import transformers.utils.import_utils as hf_imports

        # PaddleFormers' dependency paddlecodec installs a module named torchcodec without
        # torchcodec's package metadata; transformers then fails to import any processor or
        # Llava module. Neither side reads audio or video.
        hf_imports._torchcodec_available = False
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    except ImportError as e:
        raise SystemExit(f"the PyTorch side needs torch and transformers: pip install -r requirements-bench.txt ({e})")

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=FFN_VIT, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH),
        text_config=Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN_LM,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS),
        image_token_index=IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=IMAGE_TOKENS,
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    out = {}

    ids, labels, pixels = (torch.from_numpy(x) for x in _train_inputs(rng))

    def step():
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()

    model.train()
    out["train_step_ms"] = 1000 * _median_time(step, args.repeats)
    out["peak_rss_train_mb"] = _peak_rss_mb()

    model.eval()
    for b in (1, 4):
        p_ids, p_pix = (torch.from_numpy(x) for x in _prompt(rng, b))
        with torch.no_grad():
            t = _median_time(lambda: model.generate(input_ids=p_ids, pixel_values=p_pix, max_new_tokens=NEW_TOKENS,
                                                    min_new_tokens=NEW_TOKENS, do_sample=False), args.gen_repeats)
        out[f"gen_b{b}_tok_s"] = b * NEW_TOKENS / t

    lm = model.model.language_model
    head = model.lm_head
    lm_opt = torch.optim.AdamW(list(lm.parameters()) + list(head.parameters()), lr=1e-4)
    model.train()
    lengths = mixed_lengths(np.random.default_rng(1), args.pack_samples)
    seqs = [torch.from_numpy(rng.integers(0, IMAGE_ID - 1, size=n)) for n in lengths]

    def lm_step(input_ids, attention_mask=None, position_ids=None, labels=None):
        hidden = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        logits = head(hidden)[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        lm_opt.step()
        lm_opt.zero_grad()

    def padded_epoch():
        for i in range(0, len(seqs), 4):
            group = seqs[i: i + 4]
            width = max(len(s) for s in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            m = torch.zeros_like(x)
            for r, s in enumerate(group):
                x[r, : len(s)] = s
                m[r, : len(s)] = 1
            lm_step(x, m, labels=x.masked_fill(m == 0, -100))

    from paddle_mm.data.packing import plan_rows  # the same rows as the paddle_mm side

    rows = plan_rows(lengths, 1024)

    def packed_epoch():
        width = max(sum(lengths[i] for i in row) for row in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.zeros_like(x)
        # transformers 4.57 reads sample boundaries from restarting position_ids when no mask is given
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                x[r, start: start + lengths[i]] = seqs[i]
                pos[r, start: start + lengths[i]] = torch.arange(lengths[i])
                start += lengths[i]
            pos[r, start:] = torch.arange(width - start)
        lm_step(x, None, pos, labels=x)

    real = sum(lengths)
    out["padded_tok_s"] = real / _median_time(padded_epoch, 1)
    out["packed_tok_s"] = real / _median_time(packed_epoch, 1)
    out["pipeline_samples_s"] = torch_pipeline(args)
    return out


def torch_pipeline(args) -> float:
    """The same work with transformers' LlavaProcessor: PIL decode, CLIP resize/crop, tokenize, pad."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, pad_token="<|endoftext|>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                                             crop_size={"height": IMAGE, "width": IMAGE}),
                          tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default")
    folder = os.path.dirname(args.data)

    def run():
        with open(args.data, encoding="utf-8") as f:
            records = json.load(f)
        for i in range(0, len(records), BATCH):
            group = records[i: i + BATCH]
            texts = ["".join(f"<|im_start|>{'user' if t['from'] == 'human' else 'assistant'}\n{t['value']}<|im_end|>\n"
                             for t in r["conversations"]) for r in group]
            images = [Image.open(os.path.join(folder, r["image"])).convert("RGB") for r in group]
            proc(images=images, text=texts, padding=True, return_tensors="pt")

    return args.pipeline_samples / _median_time(run, 3)


# ---- the driver ------------------------------------------------------------------------------
ROWS = [
    ("training step, batch 2 x 321 tokens (ms)", "train_step_ms", False),
    ("generation, batch 1, 32 new tokens (tok/s)", "gen_b1_tok_s", True),
    ("generation, batch 4, 32 new tokens (tok/s)", "gen_b4_tok_s", True),
    ("training on mixed lengths, padded (tok/s)", "padded_tok_s", True),
    ("training on mixed lengths, packed (tok/s)", "packed_tok_s", True),
    ("data pipeline (samples/s)", "pipeline_samples_s", True),
    ("peak memory after training steps (MB RSS)", "peak_rss_train_mb", False),
]


def _side(name: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--data", args.data, "--tokenizer",
           args.tokenizer, "--threads", str(args.threads), "--repeats", str(args.repeats), "--gen-repeats",
           str(args.gen_repeats), "--pack-samples", str(args.pack_samples),
           "--pipeline-samples", str(args.pipeline_samples)] + extra
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the {name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="threads per side (0: every core)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--rounds", type=int, default=1, help="run the sides in turn this many times; medians")
    ap.add_argument("--side", choices=["paddle", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    for name, default in (("data", ""), ("tokenizer", ""), ("repeats", 5), ("gen-repeats", 3),
                          ("pack-samples", 24), ("pipeline-samples", 32)):
        ap.add_argument(f"--{name}", type=type(default), default=default, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        result = run_paddle(args) if args.side == "paddle" else run_torch(args)
        print(json.dumps(result))
        return
    if args.quick:
        args.repeats, args.gen_repeats, args.pack_samples, args.pipeline_samples = 3, 1, 16, 16
    args.threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        args.data = _write_images_and_conversations(d, args.pipeline_samples)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from paddle_mm.data.tokenizer import Tokenizer

        with open(args.data, encoding="utf-8") as f:
            texts = [t["value"] for r in json.load(f) for t in r["conversations"]]
        os.makedirs(os.path.join(d, "tok"))
        args.tokenizer = Tokenizer.train_bpe(texts, vocab_size=500).save(os.path.join(d, "tok"))
        runs = [(_side("paddle", args, []), _side("paddle", args, ["--raw"]), _side("torch", args, []))
                for _ in range(max(1, args.rounds))]
    tuned, raw, ref = ({k: float(np.median([r[side][k] for r in runs])) for k in runs[0][side]} for side in range(3))
    print(f"\n{args.threads} threads per side, median of {len(runs)} round(s); ratio = paddle_mm / PyTorch, "
          f"oriented so >1 means paddle_mm is better\n")
    print("| measurement | paddle_mm | paddle_mm, Paddle's defaults | HF transformers (PyTorch) | ratio |")
    print("|---|---|---|---|---|")
    for label, key, higher_better in ROWS:
        ours, base, theirs = tuned.get(key), raw.get(key), ref.get(key)
        ratio = ours / theirs if higher_better else theirs / ours
        base_s = f"{base:.1f}" if base is not None else "-"
        print(f"| {label} | {ours:.1f} | {base_s} | {theirs:.1f} | {ratio:.2f}x |")
    steps_per_s = 1000 / tuned["train_step_ms"]
    print(f"\npacking speed-up: paddle_mm {tuned['packed_tok_s'] / tuned['padded_tok_s']:.2f}x "
          f"(rows {tuned['packed_fill']:.0%} real tokens vs {tuned['padded_fill']:.0%} padded), "
          f"PyTorch {ref['packed_tok_s'] / ref['padded_tok_s']:.2f}x")
    print(f"data pipeline vs training consumption: {tuned['pipeline_samples_s']:.1f} samples/s against "
          f"{BATCH * steps_per_s:.1f} samples/s consumed = {tuned['pipeline_samples_s'] / (BATCH * steps_per_s):.1f}x")


if __name__ == "__main__":
    main()
