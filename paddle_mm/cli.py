"""The `paddle-mm` command: train, infer, eval, demo, tokenizer.

Thin: each subcommand parses its arguments and calls the library. Heavy imports (paddle,
PaddleFormers) happen inside the subcommands so `paddle-mm --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys

from paddle_mm.errors import PaddleMMError


def _train(args) -> None:
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe
    from paddle_mm.train import train

    recipe = load_recipe(args.recipe, Recipe, args.overrides)
    print(train(recipe))


def _load(run_dir: str):
    from paddle_mm.builder import image_processor_for, load_run
    from paddle_mm.runtime import configure_cpu

    configure_cpu()
    recipe, _, tokenizer, model = load_run(run_dir)
    return recipe, tokenizer, model, image_processor_for(recipe)


def _infer(args) -> None:
    from paddle_mm.evaluate import generate_answers
    from paddle_mm.infer import request_to_sample, run_requests

    recipe, tokenizer, model, proc = _load(args.run_dir)
    infer = recipe.infer
    if args.max_new_tokens:
        infer.max_new_tokens = args.max_new_tokens
    if args.input:
        if not args.output:
            raise SystemExit("--input needs --output (a JSONL file answers are appended to)")
        counts = run_requests(model, tokenizer, proc, infer, args.input, args.output)
        print(json.dumps(counts))
        return
    if args.task == "chat" and not args.prompt:
        _chat_loop(args.image, model, tokenizer, proc, infer)
        return
    request = {"id": "0", "task": args.task, "image": args.image, "prompt": args.prompt}
    answers = generate_answers(model, tokenizer, [request_to_sample(request, infer, "command line")], proc, infer)
    print(answers["0"])


def _chat_loop(image, model, tokenizer, proc, infer) -> None:
    """Multi-turn chat on stdin: each line is a user turn; the history is kept until EOF."""
    from paddle_mm.evaluate import generate_answers
    from paddle_mm.infer import request_to_sample

    messages: list[dict] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        sample = request_to_sample({"id": "chat", "task": "chat", "image": image, "messages": messages},
                                   infer, "chat")
        answer = generate_answers(model, tokenizer, [sample], proc, infer)["chat"]
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def _eval(args) -> None:
    from paddle_mm.data.readers import read_captions, read_vqav2
    from paddle_mm.evaluate import evaluate_captions, evaluate_vqa

    report: dict = {}
    if args.retrieval or args.zero_shot:  # an align or clip run: no language model to answer with
        from paddle_mm.alignment.evaluate import evaluate_alignment_run
        from paddle_mm.runtime import configure_cpu

        configure_cpu()
        report = evaluate_alignment_run(args.run_dir, args.retrieval, args.zero_shot, args.image_root)
    if args.vqa_questions or args.captions:
        recipe, tokenizer, model, proc = _load(args.run_dir)
    if args.vqa_questions:
        kw = {"image_root": args.image_root or None, "prompt_template": recipe.infer.vqa_prompt}
        if args.image_pattern:
            kw["image_pattern"] = args.image_pattern
        samples = read_vqav2(args.vqa_questions, args.vqa_annotations, **kw).samples
        report["vqa"] = evaluate_vqa(model, tokenizer, samples, proc, recipe.infer, blind=args.blind)
    if args.captions:
        samples = read_captions(args.captions, image_root=args.image_root or None,
                                prompt=recipe.infer.caption_prompt).samples
        report["caption"] = evaluate_captions(model, tokenizer, samples, proc, recipe.infer)
    if not report:
        raise SystemExit("nothing to evaluate: give --vqa-questions/--vqa-annotations, --captions, "
                         "--retrieval or --zero-shot")
    scores = {task: {k: v for k, v in r.items() if k != "predictions"} for task, r in report.items()}
    print(json.dumps(scores, indent=1))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


def _demo(args) -> None:
    from paddle_mm.demo import run_demo

    run_demo(args.out, quick=args.quick, extra=args.overrides, scale=args.scale, processes=args.processes,
             pipeline="qformer" if args.qformer else "mlp")


def _tokenizer(args) -> None:
    from paddle_mm.tokenizer import Tokenizer, training_corpus

    tok = Tokenizer.train_bpe(training_corpus(args.corpus), vocab_size=args.vocab_size)
    print(tok.save(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddle-mm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the training stage a recipe describes")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the recipe")
    p.set_defaults(func=_train)

    p = sub.add_parser("infer", help="answer with a trained run: vqa, caption or chat")
    p.add_argument("run_dir")
    p.add_argument("--task", choices=["vqa", "caption", "chat"], default="vqa")
    p.add_argument("--image")
    p.add_argument("--prompt", default="", help="the question; for --task chat without it, read turns from stdin")
    p.add_argument("--input", help="JSONL of requests")
    p.add_argument("--output", help="JSONL the answers are appended to")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.set_defaults(func=_infer)

    p = sub.add_parser("eval", help="VQAv2 accuracy, caption BLEU-4 / ROUGE-L / CIDEr-D; retrieval, zero-shot")
    p.add_argument("run_dir")
    p.add_argument("--vqa-questions")
    p.add_argument("--vqa-annotations")
    p.add_argument("--image-pattern", default="")
    p.add_argument("--image-root", default="")
    p.add_argument("--captions")
    p.add_argument("--blind", action="store_true", help="blank every image (the no-vision baseline)")
    p.add_argument("--retrieval", default="", help="captions JSON: recall@1/5/10 both ways (align/clip runs)")
    p.add_argument("--zero-shot", default="", help="zero-shot task JSON: classification accuracy (align/clip runs)")
    p.add_argument("--output", help="write scores and predictions as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="synthetic data -> pretrain -> instruct -> evaluation, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="the small CI-sized variant")
    p.add_argument("--qformer", action="store_true",
                   help="a Q-Former projector, trained align (ITC/ITM/ITG) -> pretrain -> instruct")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (a longer run)")
    p.add_argument("--processes", type=int, default=0, help="data-parallel training processes (0: one per core)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both stages")
    p.set_defaults(func=_demo)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("corpus", nargs="+")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PaddleMMError as e:  # bad input: one readable line, no stack trace
        print(f"paddle-mm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
