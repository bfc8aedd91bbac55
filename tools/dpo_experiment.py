"""SFT briefly, then DPO: does preference tuning cut hallucination on held-out scenes?

    python tools/dpo_experiment.py --out runs/dpo_exp [--instruct-steps 400 --dpo-steps 1600]

Quick-sized demo data (1000 train scenes; 20 val / 60 test, or --val-scenes / --test-scenes N) and the
quick demo's stage lengths (pretrain 150, instruct 400 steps): short enough that the instruct model
still hallucinates. DPO (recipes/demo/dpo.yaml) then trains on the bundled preference pairs of the
train scenes. Before and after DPO, on the val scenes (to choose settings by) and the test scenes
(to report): VQA accuracy, POPE per setting and CHAIR of the captions. Writes one JSON report
(figures, the reward-margin curve, wall times) to OUT/report_<dpo-name>.json and prints its changes.
--start NAME runs a second round from an earlier DPO run, rejecting that model's own captions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def evaluate(run_dir: str, data: str, split: str, pope_file: str, predictions_file: str) -> dict:
    from paddle_mm.builder import image_processor_for
    from paddle_mm.data.readers import read_pope, read_vqav2
    from paddle_mm.data.synthetic import vqa_image_pattern
    from paddle_mm.eval.hallucination import evaluate_chair, evaluate_pope
    from paddle_mm.eval.tasks import evaluate_vqa
    from paddle_mm.run_folder import load_run

    recipe, _, tokenizer, model = load_run(run_dir)
    proc = image_processor_for(recipe)
    questions = read_vqav2(f"{data}/{split}_vqa_questions.json", f"{data}/{split}_vqa_annotations.json",
                           image_pattern=vqa_image_pattern(split), prompt_template=recipe.infer.vqa_prompt).samples
    vqa = evaluate_vqa(model, tokenizer, questions, proc, recipe.infer)
    pope = evaluate_pope(model, tokenizer, read_pope(pope_file).samples, proc, recipe.infer)
    chair = evaluate_chair(model, tokenizer, data, split, proc, recipe.infer)
    # The answers themselves, beside the report: which objects the captions invent, what POPE got.
    with open(predictions_file, "w", encoding="utf-8") as f:
        json.dump({"captions": chair["predictions"], "pope": pope["predictions"]}, f, indent=0)
    return {"vqa_accuracy": vqa["overall"],
            "pope": {k: v for k, v in pope.items() if k != "predictions"},
            "chair_s": chair["chair_s"], "chair_i": chair["chair_i"], "chair_mentions": chair["mentions"]}


def own_captions(run_dir: str, data: str) -> dict:
    """A run's (greedy) captions of the train scenes, made once and kept in its folder."""
    from paddle_mm.builder import image_processor_for
    from paddle_mm.eval.hallucination import evaluate_chair
    from paddle_mm.run_folder import load_run

    path = os.path.join(run_dir, "train_captions.json")
    if not os.path.isfile(path):
        recipe, _, tokenizer, model = load_run(run_dir)
        report = evaluate_chair(model, tokenizer, data, "train", image_processor_for(recipe), recipe.infer)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"chair_i": report["chair_i"], "captions": report["predictions"]}, f, indent=0)
    return json.load(open(path, encoding="utf-8"))["captions"]


def evaluate_splits(run_dir: str, data: str, name: str, pope_files: dict) -> dict:
    """Figures on val (to choose settings by) and on test (to report)."""
    return {split: evaluate(run_dir, data, split, pope, os.path.join(os.path.dirname(run_dir),
                                                                     f"predictions_{name}_{split}.json"))
            for split, pope in pope_files.items()}


def changes(before: dict, after: dict) -> dict:
    return {"chair_i": (after["chair_i"] - before["chair_i"]) / before["chair_i"] if before["chair_i"] else None,
            "pope_adversarial_f1": after["pope"]["adversarial"]["f1"] - before["pope"]["adversarial"]["f1"],
            "vqa_accuracy": after["vqa_accuracy"] - before["vqa_accuracy"]}


def main() -> None:
    from paddle_mm.demo.pipeline import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/dpo_exp")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--instruct-steps", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=1600, help="the bundled recipe's")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--test-scenes", type=int, default=SIZES["quick"][2],
                    help="held-out scenes to measure on (the train and val splits, and so the runs, stay the same: "
                    "each split has its own seed); more than the quick demo's 60 narrows the figures' noise")
    ap.add_argument("--val-scenes", type=int, default=SIZES["quick"][1],
                    help="scenes of the val split, where settings are compared (its own seed: the other splits "
                    "stay the same); the test figures are reported, not chosen by")
    ap.add_argument("--dpo-name", default="dpo", help="the DPO run's folder under OUT (one per setting tried)")
    ap.add_argument("--start", default="instruct",
                    help="the run under OUT that DPO starts from, also the frozen reference and the source of "
                    "--model-captions: an earlier DPO run's name makes this a second round on that model's own "
                    "captions (the figures stay compared with the instruct run's)")
    ap.add_argument("--presence-per-image", type=int, default=3,
                    help="the pairs' POPE-style presence questions per scene: up to N present and as many absent")
    ap.add_argument("--caption-edits", help="one rejected caption per edit, comma-separated (eval/hallucination.py "
                    "CAPTION_EDITS; default: the bundled pairs')")
    ap.add_argument("--model-captions", action="store_true",
                    help="also reject the --start run's own captions of the train scenes where they hallucinate")
    ap.add_argument("--model-corrections", action="store_true",
                    help="with --model-captions: also reject each such caption against itself mended, the objects "
                    "it meant named rightly (eval/hallucination.py corrected_caption)")
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
    files = generate_demo_data(data, SIZES["quick"][0], args.val_scenes, args.test_scenes, seed=0)
    tok = Tokenizer.train_bpe(training_corpus([files["corpus"]]), vocab_size=400)
    tok.save(os.path.join(args.out, "tokenizer"))
    pope_files = {split: write_pope_file(data, split) for split in ("val", "test")}
    threads = [f"train.num_threads={args.threads}"] if args.threads else []
    stages = () if args.reuse_instruct else (("pretrain", args.pretrain_steps), ("instruct", args.instruct_steps))
    for stage, steps in stages:
        t = time.time()
        train(stage_recipe(stage, args.out, [f"train.max_steps={steps}", "train.eval_every=0",
                                             "train.eval_answers=0", "data.eval=[]", *threads]), quiet=True)
        times[stage] = time.time() - t
    before_file = os.path.join(args.out, "report_instruct.json")
    before = json.load(open(before_file, encoding="utf-8")) if args.reuse_instruct and os.path.isfile(before_file) else {}
    # The same run gives the same figures, but only on the same held-out scenes.
    scenes = {"val_scenes": args.val_scenes, "test_scenes": args.test_scenes}
    if {k: before.get(k) for k in scenes} != scenes:
        before = {**scenes, **evaluate_splits(os.path.join(args.out, "instruct"), data, "instruct", pope_files)}
        with open(before_file, "w", encoding="utf-8") as f:
            json.dump(before, f, indent=1)

    start = os.path.join(args.out, args.start)
    edits = {} if args.caption_edits is None else {"caption_edits": [e for e in args.caption_edits.split(",") if e]}
    pairs = write_preference_pairs(data, "train", presence_per_image=args.presence_per_image, **edits,
                                   model_captions=own_captions(start, data) if args.model_captions else None,
                                   model_corrections=args.model_corrections)
    t = time.time()
    dpo = load_recipe(os.path.join(bundled_recipes(), "demo", "dpo.yaml"), Recipe, [
        f"data.tokenizer={os.path.join(args.out, 'tokenizer', 'tokenizer.json')}",
        f"data.train=[{{path: {pairs}, format: llava_pairs}}]", f"train.output_dir={os.path.join(args.out, args.dpo_name)}",
        f"train.init_from={start}", f"train.max_steps={args.dpo_steps}", *threads, *args.overrides])
    train(dpo, quiet=True)
    times["dpo"] = time.time() - t
    after = evaluate_splits(os.path.join(args.out, args.dpo_name), data, args.dpo_name, pope_files)
    curve = [{k: r[k] for k in ("step", "loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")}
             for r in read_metrics(os.path.join(args.out, args.dpo_name))]
    report = {**scenes, "start": args.start, "before_dpo": before, "after_dpo": after,
              "change": {split: changes(before[split], after[split]) for split in pope_files},
              "reward_margin_curve": curve, "dpo_recipe": {"steps": args.dpo_steps, **vars(dpo.train.dpo)},
              "overrides": args.overrides,
              "pairs": {"presence_per_image": args.presence_per_image, "caption_edits": args.caption_edits,
                        "model_captions": args.model_captions,
                        "model_corrections": args.model_corrections},
              "wall_s": {**times, "total": time.time() - t0}}
    with open(os.path.join(args.out, f"report_{args.dpo_name}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("change", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
