"""SFT briefly, then DPO: does preference tuning cut hallucination on held-out scenes?

    python tools/dpo_experiment.py --out runs/dpo_exp [--instruct-steps 400 --dpo-steps 800]

Quick-sized demo data (1000 train / 20 val / 60 test scenes, or --test-scenes N) and the quick demo's stage
lengths (pretrain 150, instruct 400 steps): short enough that the instruct model still
hallucinates. DPO (recipes/demo/dpo.yaml) then trains on the bundled preference pairs of the
train scenes. Before and after DPO, on the test scenes:
VQA accuracy, POPE per setting and CHAIR of the captions. Prints one JSON report (figures,
the reward-margin curve, wall times) and writes it to OUT/report_<dpo-name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def evaluate(run_dir: str, data: str, pope_file: str, predictions_file: str) -> dict:
    from paddle_mm.builder import image_processor_for
    from paddle_mm.data.readers import read_pope, read_vqav2
    from paddle_mm.data.synthetic import vqa_image_pattern
    from paddle_mm.eval.hallucination import evaluate_chair, evaluate_pope
    from paddle_mm.eval.tasks import evaluate_vqa
    from paddle_mm.run_folder import load_run

    recipe, _, tokenizer, model = load_run(run_dir)
    proc = image_processor_for(recipe)
    questions = read_vqav2(f"{data}/test_vqa_questions.json", f"{data}/test_vqa_annotations.json",
                           image_pattern=vqa_image_pattern("test"), prompt_template=recipe.infer.vqa_prompt).samples
    vqa = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer)
    pope = evaluate_pope(model, tokenizer, read_pope(pope_file).samples, proc, recipe.infer)
    chair = evaluate_chair(model, tokenizer, data, "test", proc, recipe.infer)
    # The answers themselves, beside the report: which objects the captions invent, what POPE got.
    with open(predictions_file, "w", encoding="utf-8") as f:
        json.dump({"captions": chair["predictions"], "pope": pope["predictions"]}, f, indent=0)
    return {"vqa_accuracy": vqa["overall"],
            "pope": {k: v for k, v in pope.items() if k != "predictions"},
            "chair_s": chair["chair_s"], "chair_i": chair["chair_i"], "chair_mentions": chair["mentions"]}


def instruct_captions(out: str, data: str) -> dict:
    """The instruct run's (greedy) captions of the train scenes, made once and kept in OUT."""
    from paddle_mm.builder import image_processor_for
    from paddle_mm.eval.hallucination import evaluate_chair
    from paddle_mm.run_folder import load_run

    path = os.path.join(out, "instruct_train_captions.json")
    if not os.path.isfile(path):
        recipe, _, tokenizer, model = load_run(os.path.join(out, "instruct"))
        report = evaluate_chair(model, tokenizer, data, "train", image_processor_for(recipe), recipe.infer)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"chair_i": report["chair_i"], "captions": report["predictions"]}, f, indent=0)
    return json.load(open(path, encoding="utf-8"))["captions"]


def main() -> None:
    from paddle_mm.demo.pipeline import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/dpo_exp")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--instruct-steps", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=800)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--test-scenes", type=int, default=SIZES["quick"][2],
                    help="held-out scenes to measure on (the train and val splits, and so the runs, stay the same: "
                    "each split has its own seed); more than the quick demo's 60 narrows the figures' noise")
    ap.add_argument("--dpo-name", default="dpo", help="the DPO run's folder under OUT (one per setting tried)")
    ap.add_argument("--presence-per-image", type=int, default=3,
                    help="the pairs' POPE-style presence questions per scene: up to N present and as many absent")
    ap.add_argument("--caption-edits", help="one rejected caption per edit, comma-separated (eval/hallucination.py "
                    "CAPTION_EDITS; default: the bundled pairs')")
    ap.add_argument("--model-captions", action="store_true",
                    help="also reject the instruct run's own captions of the train scenes where they hallucinate")
    ap.add_argument("--reuse-instruct", action="store_true",
                    help="start from OUT/instruct as an earlier call left it (the stages are deterministic)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for the DPO stage (train.dpo.beta=0.2 ...)")
    args = ap.parse_args()

    from paddle_mm.config import Recipe
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus
    from paddle_mm.demo.pipeline import stage_recipe
    from paddle_mm.eval.hallucination import write_pope_file, write_preference_pairs
    from paddle_mm.recipe import bundled_recipes, load_recipe
    from paddle_mm.training.loop import train
    from paddle_mm.training.runlog import read_metrics

    t0, times = time.time(), {}
    data = os.path.join(args.out, "data")
    files = generate_demo_data(data, *SIZES["quick"][:2], args.test_scenes, seed=0)
    tok = Tokenizer.train_bpe(training_corpus([files["corpus"]]), vocab_size=400)
    tok.save(os.path.join(args.out, "tokenizer"))
    pope_file = write_pope_file(data, "test")
    threads = [f"train.num_threads={args.threads}"] if args.threads else []
    stages = () if args.reuse_instruct else (("pretrain", args.pretrain_steps), ("instruct", args.instruct_steps))
    if stages and os.path.isfile(os.path.join(args.out, "instruct_train_captions.json")):
        os.remove(os.path.join(args.out, "instruct_train_captions.json"))  # an earlier instruct run's
    for stage, steps in stages:
        t = time.time()
        train(stage_recipe(stage, args.out, [f"train.max_steps={steps}", "train.eval_every=0",
                                             "train.eval_answers=0", "data.eval=[]", *threads]), quiet=True)
        times[stage] = time.time() - t
    before_file = os.path.join(args.out, "report_instruct.json")
    before = json.load(open(before_file, encoding="utf-8")) if args.reuse_instruct and os.path.isfile(before_file) else {}
    # The same run gives the same figures, but only on the same held-out scenes.
    if before.get("test_scenes") != args.test_scenes:
        before = {"test_scenes": args.test_scenes,
                  **evaluate(os.path.join(args.out, "instruct"), data, pope_file,
                             os.path.join(args.out, "predictions_instruct.json"))}
        with open(before_file, "w", encoding="utf-8") as f:
            json.dump(before, f, indent=1)

    edits = {} if args.caption_edits is None else {"caption_edits": [e for e in args.caption_edits.split(",") if e]}
    pairs = write_preference_pairs(data, "train", presence_per_image=args.presence_per_image, **edits,
                                   model_captions=instruct_captions(args.out, data) if args.model_captions else None)
    t = time.time()
    dpo = load_recipe(os.path.join(bundled_recipes(), "demo", "dpo.yaml"), Recipe, [
        f"data.tokenizer={os.path.join(args.out, 'tokenizer', 'tokenizer.json')}",
        f"data.train=[{{path: {pairs}, format: llava_pairs}}]", f"train.output_dir={os.path.join(args.out, args.dpo_name)}",
        f"train.init_from={os.path.join(args.out, 'instruct')}", f"train.max_steps={args.dpo_steps}",
        *threads, *args.overrides])
    train(dpo, quiet=True)
    times["dpo"] = time.time() - t
    after = evaluate(os.path.join(args.out, args.dpo_name), data, pope_file,
                     os.path.join(args.out, f"predictions_{args.dpo_name}.json"))
    curve = [{k: r[k] for k in ("step", "loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")}
             for r in read_metrics(os.path.join(args.out, args.dpo_name))]
    report = {"test_scenes": args.test_scenes, "before_dpo": before, "after_dpo": after,
              "chair_i_change": (after["chair_i"] - before["chair_i"]) / before["chair_i"] if before["chair_i"] else None,
              "pope_adversarial_f1_change": after["pope"]["adversarial"]["f1"] - before["pope"]["adversarial"]["f1"],
              "vqa_accuracy_change": after["vqa_accuracy"] - before["vqa_accuracy"],
              "reward_margin_curve": curve, "dpo_recipe": {"steps": args.dpo_steps, **vars(dpo.train.dpo)},
              "pairs": {"presence_per_image": args.presence_per_image, "caption_edits": args.caption_edits,
                        "model_captions": args.model_captions},
              "wall_s": {**times, "total": time.time() - t0}}
    with open(os.path.join(args.out, f"report_{args.dpo_name}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
