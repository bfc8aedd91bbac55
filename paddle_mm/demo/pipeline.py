"""The demo: synthetic scenes -> tokenizer -> pretrain -> instruct -> held-out evaluation.

Each stage validates on the val split while it trains (training/validation.py); curves.png
draws that held-out loss beside the training loss. Validation leaves the training run as it
was, so the test-split figures are those of a run without it.

Everything runs on CPU from the recipes in recipes/demo/ (installed with the package, see
recipe.bundled_recipes). The tiny ViT and LM have no pretrained weights to start
from (none can be downloaded), so both demo stages train all three parts; a pretrain recipe
for real checkpoints keeps the vision tower and LM frozen (trainable: [multi_modal_projector]).
"""
from __future__ import annotations

import os
import sys
import time

from paddle_mm.config import Recipe
from paddle_mm.data.tokenizer import TOKENIZER_FILE
from paddle_mm.fileio import write_json_atomic
from paddle_mm.recipe import bundled_recipes, load_recipe
from paddle_mm.run_folder import PROJECTOR_FILE

# The routes: the MLP (LLaVA) in two stages; the Q-Former (BLIP-2) with stage 1 first; a Qwen2-VL
# (native-resolution encoder, patch merger, M-RoPE LM) in the MLP's two stages.
PIPELINES = {"mlp": ("demo", ("pretrain", "instruct")),
             "qformer": ("qformer_demo", ("align", "pretrain", "instruct")),
             "qwen2-vl": ("qwen2_vl_demo", ("pretrain", "instruct"))}

# (train, val, test) images; quick is the CI-sized variant of the same pipeline.
SIZES = {"full": (3000, 200, 500), "quick": (1000, 20, 60)}
# The multi variant's (train, val, test) items, each a pair of scenes and a clip with two
# questions each (data/synthetic_multi.py), beside the scenes above.
MULTI_SIZES = {"full": (1500, 50, 250), "quick": (500, 10, 50)}
# The quick variant's steps per stage (and the log and validation intervals so its curves have points).
QUICK_STEPS = {"align": 150, "pretrain": 150, "instruct": 400}
QUICK_EVAL_EVERY = 50


def _paths(out: str) -> dict[str, str]:
    data = os.path.join(out, "data")
    return {
        "data": data,
        "tokenizer": os.path.join(out, "tokenizer", TOKENIZER_FILE),
        "text_tokenizer": os.path.join(out, "text_tokenizer"),
        "align": os.path.join(out, "align"),
        "pretrain": os.path.join(out, "pretrain"),
        "instruct": os.path.join(out, "instruct"),
    }


def stage_recipe(stage: str, out: str, extra: list[str], pipeline: str = "mlp", multi: bool = False) -> Recipe:
    """A demo stage's recipe with its data, tokenizer and output paths placed under `out`; with
    multi the instruct stage also trains (and validates) on the two-image and clip conversations."""
    p = _paths(out)
    d = p["data"]
    llava = ", ".join([f"{{path: {d}/{{split}}_llava.json, format: llava}}"]
                      + ([f"{{path: {d}/{{split}}_multi_llava.json, format: llava}}"] if multi else []))
    overrides = [
        f"data.tokenizer={p['tokenizer']}",
        f"train.output_dir={p[stage]}",
        f"data.train=[{{path: {d}/train_captions.json, format: caption}}]" if stage in ("align", "pretrain")
        else f"data.train=[{llava.replace('{split}', 'train')}]",
        # Validation while training, on the val split (never the test split the summary reports).
        f"data.eval=[{{path: {d}/val_captions.json, format: caption}}]" if stage in ("align", "pretrain")
        else f"data.eval=[{llava.replace('{split}', 'val')}]",
    ]
    if stage == "instruct":
        overrides.append(f"train.init_from={p['pretrain']}")
    if pipeline == "qformer":
        overrides.append(f"model.text.tokenizer={p['text_tokenizer']}")
        if stage == "pretrain":
            overrides += [f"train.projector_from={os.path.join(p['align'], PROJECTOR_FILE)}", f"train.vision_from={p['align']}"]
    folder = os.path.join(bundled_recipes(), PIPELINES[pipeline][0])
    return load_recipe(os.path.join(folder, f"{stage}.yaml"), Recipe, overrides + extra)


def run_demo(out: str = "runs/demo", quick: bool = False, extra: list[str] = (), scale: float = 1.0,
             processes: int = 0, pipeline: str = "mlp", multi: bool = False) -> dict:
    """Run the whole demo; `scale` multiplies every stage's steps (to see how accuracy grows).

    pipeline "qformer" trains a Q-Former projector in three stages (align, pretrain, instruct)
    and reports the align stage's held-out retrieval too; "qwen2-vl" trains a Qwen2-VL from
    scratch (recipes/qwen2_vl_demo) in the MLP's two stages. multi adds the questions over two
    images and over clips (data/synthetic_multi.py) to the instruct stage and reports their
    held-out accuracy per type beside the blanked-image and question-prior baselines.

    Training runs data-parallel in `processes` processes (0: one per core). On CPU this model
    is too small for Paddle's intra-op threads to help (1 and 2 threads measured the same
    samples/s here), while two one-thread processes nearly double the throughput.
    """
    from paddle_mm.builder import image_processor_for
    from paddle_mm.data.readers import read_captions, read_llava, read_vqav2
    from paddle_mm.data.synthetic import generate_demo_data, vqa_image_pattern
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus
    from paddle_mm.eval.tasks import evaluate_captions, evaluate_vqa, question_prior_report
    from paddle_mm.run_folder import load_run
    from paddle_mm.training.launch import train_in_processes
    from paddle_mm.training.plot import plot_runs

    t0 = time.time()
    p = _paths(out)
    sizes = SIZES["quick" if quick else "full"]
    files = generate_demo_data(p["data"], *sizes, seed=0)
    corpora = [files["corpus"]]
    if multi:
        from paddle_mm.data.synthetic_multi import generate_multi_data

        corpora.append(generate_multi_data(p["data"], *MULTI_SIZES["quick" if quick else "full"], seed=0)["corpus"])
    tokenizer = Tokenizer.train_bpe(training_corpus(corpora), vocab_size=400)
    tokenizer.save(os.path.dirname(p["tokenizer"]))
    _say(f"data: {sizes[0]} train / {sizes[2]} test scenes; tokenizer: {tokenizer.vocab_size} tokens")
    retrieval = None
    if pipeline == "qformer":
        from paddle_mm.alignment.text import TextTokenizer

        TextTokenizer.train(training_corpus([files["corpus"]]), p["text_tokenizer"], vocab_size=300)

    for stage in PIPELINES[pipeline][1]:
        quick_overrides = [f"train.max_steps={QUICK_STEPS[stage]}", "train.log_every=10",
                           f"train.eval_every={QUICK_EVAL_EVERY}"] if quick else []
        recipe = stage_recipe(stage, out, quick_overrides + list(extra), pipeline, multi and stage == "instruct")
        if scale != 1.0:
            recipe.train.max_steps = max(1, round(recipe.train.max_steps * scale))
        _say(f"stage {stage}: {recipe.train.max_steps} steps, trainable {recipe.train.trainable}")
        train_in_processes(recipe, processes or os.cpu_count() or 1)
        if stage == "align":
            from paddle_mm.eval.alignment import evaluate_alignment_run

            retrieval = evaluate_alignment_run(p["align"], captions=f"{p['data']}/test_captions.json")["retrieval"]
            _say(f"align: held-out retrieval {retrieval}")
    recipe, _, tokenizer, model = load_run(p["instruct"])
    proc = image_processor_for(recipe)
    d = p["data"]
    questions = read_vqav2(f"{d}/test_vqa_questions.json", f"{d}/test_vqa_annotations.json",
                           image_pattern=vqa_image_pattern("test"), prompt_template=recipe.infer.vqa_prompt).samples
    captions = read_captions(f"{d}/test_captions.json", prompt=recipe.infer.caption_prompt).samples
    vqa = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer)
    blind = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer, blind=True)
    caps = evaluate_captions(model, tokenizer, captions, proc, recipe.infer)
    prior = question_prior_report(read_llava(f"{d}/train_llava.json").samples, questions)
    summary = {
        "vqa_accuracy": vqa["overall"],
        "vqa_per_type": vqa["per_type"],
        "blind_vqa_accuracy": blind["overall"],
        "blind_per_type": blind["per_type"],
        "prior_vqa_accuracy": prior["overall"],
        "prior_per_type": prior["per_type"],
        "caption": {k: caps[k] for k in ("BLEU-4", "ROUGE-L", "CIDEr-D")},
        "num_test_questions": vqa["count"],
        "num_test_images": len(captions),
        "wall_time_s": round(time.time() - t0, 1),
        "quick": quick,
        "steps_scale": scale,
        "processes": processes or os.cpu_count() or 1,
        "pipeline": pipeline,
    }
    if retrieval is not None:
        summary["align_retrieval"] = retrieval
    if multi:
        summary["multi"] = _evaluate_multi(model, tokenizer, proc, recipe, d)
        summary["wall_time_s"] = round(time.time() - t0, 1)
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    print(format_summary(summary))
    _say(f"training curves: {plot_runs([p['pretrain'], p['instruct']], os.path.join(out, 'curves.png'))}")
    q = questions[0]
    answer = vqa["predictions"][q.id]
    print(f"\nimage {q.images[0]}\nQ: {q.turns[0][1].split(chr(10))[-1]}\nA: {answer}  (expected: {q.turns[-1][1]})")
    return summary


def _evaluate_multi(model, tokenizer, proc, recipe, d: str) -> dict:
    """Held-out accuracy per type on the two-image and clip questions, with both baselines."""
    from paddle_mm.data.readers import read_llava, read_vqav2
    from paddle_mm.data.synthetic_multi import pair_image_pattern
    from paddle_mm.eval.tasks import evaluate_vqa, question_prior_report

    questions = read_vqav2(f"{d}/test_multi_vqa_questions.json", f"{d}/test_multi_vqa_annotations.json",
                           image_pattern=pair_image_pattern("test"), prompt_template=recipe.infer.vqa_prompt,
                           video_frames=recipe.data.video_frames).samples
    vqa = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer)
    blind = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer, blind=True)
    prior = question_prior_report(read_llava(f"{d}/train_multi_llava.json").samples, questions)
    return {"vqa_accuracy": vqa["overall"], "per_type": vqa["per_type"], "blind_vqa_accuracy": blind["overall"],
            "blind_per_type": blind["per_type"], "prior_vqa_accuracy": prior["overall"],
            "prior_per_type": prior["per_type"], "num_test_questions": vqa["count"]}


def format_summary(s: dict) -> str:
    rows = [("VQA accuracy: image / blanked image / question prior",
             f"{s['vqa_accuracy']:.3f} / {s['blind_vqa_accuracy']:.3f} / {s['prior_vqa_accuracy']:.3f}")]
    rows += [(f"  {t}", f"{v:.3f} / {s['blind_per_type'].get(t, 0):.3f} / {s['prior_per_type'].get(t, 0):.3f}")
             for t, v in sorted(s["vqa_per_type"].items())]
    if "multi" in s:
        m = s["multi"]
        rows.append(("two images and clips: image / blanked / prior",
                     f"{m['vqa_accuracy']:.3f} / {m['blind_vqa_accuracy']:.3f} / {m['prior_vqa_accuracy']:.3f}"))
        rows += [(f"  {t}", f"{v:.3f} / {m['blind_per_type'].get(t, 0):.3f} / {m['prior_per_type'].get(t, 0):.3f}")
                 for t, v in sorted(m["per_type"].items())]
    rows += [(name, value) for name, value in s["caption"].items()]
    if "align_retrieval" in s:
        r = s["align_retrieval"]
        rows.append(("align retrieval R@1 image->text / text->image (chance)",
                     f"{r['i2t']['R@1']:.3f} / {r['t2i']['R@1']:.3f} "
                     f"({r['chance']['i2t']['R@1']:.3f} / {r['chance']['t2i']['R@1']:.3f})"))
    rows += [("test questions / images", f"{s['num_test_questions']} / {s['num_test_images']}"),
             ("wall time", f"{s['wall_time_s']:.0f} s")]
    width = max(len(r[0]) for r in rows)
    lines = ["", "paddle_mm demo: held-out test split", "-" * (width + 18)]
    for name, value in rows:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)
