"""The `paddle-mm` command: train, check-data, infer, eval, demo, tokenizer, convert, export, plot, serve.

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
    from paddle_mm.training.loop import train

    recipe = load_recipe(args.recipe, Recipe, args.overrides)
    print(train(recipe))


def _check_data(args) -> int:
    from paddle_mm.config import Recipe
    from paddle_mm.fileio import write_json_atomic
    from paddle_mm.recipe import load_recipe
    from paddle_mm.training.check_data import check_data, default_report_path, passed, summary

    recipe = load_recipe(args.recipe, Recipe, args.overrides)
    report = check_data(recipe, decode_images=not args.no_decode)
    report.update(recipe=args.recipe, max_bad_fraction=args.max_bad_fraction,
                  passed=passed(report, args.max_bad_fraction))
    path = args.report or default_report_path(recipe)
    write_json_atomic(path, report)
    print(summary(report, args.max_bad_fraction))
    print(f"report: {path}")
    return 0 if report["passed"] else 1


def _load(run_dir: str):
    from paddle_mm.api import load  # the public API's loader: a run folder or a downloaded one

    vlm = load(run_dir)
    return vlm.recipe, vlm.tokenizer, vlm.model, vlm.image_processor


def _infer(args) -> None:
    import os

    from paddle_mm.inference.generate import generate_answers
    from paddle_mm.inference.requests import request_to_sample, run_requests

    recipe, tokenizer, model, proc = _load(args.run_dir)
    infer = recipe.infer
    if args.max_new_tokens:
        infer.max_new_tokens = args.max_new_tokens
    if args.mrope_advance:
        if not hasattr(model.config, "mrope_advance"):
            raise SystemExit("--mrope-advance: only Qwen2-VL models have M-RoPE positions")
        model.config.mrope_advance = args.mrope_advance
    if args.video_fps:
        if not hasattr(getattr(proc, "settings", None), "fps"):
            raise SystemExit("--video-fps: this model reads a clip as its frames; it has no frame rate")
        proc.settings.fps = args.video_fps
    if args.input:
        if not args.output:
            raise SystemExit("--input needs --output (a JSONL file answers are appended to)")
        counts = run_requests(model, tokenizer, proc, infer, args.input, args.output)
        print(json.dumps(counts))
        return
    if args.task == "chat" and not args.prompt:
        if args.video:
            raise SystemExit("--video: give the chat's first turn with --prompt (the stdin chat takes images only)")
        _chat_loop(args.image, model, tokenizer, proc, infer)
        return
    request = {"id": "0", "task": args.task, "images": args.image, "prompt": args.prompt}
    if args.video:  # one folder of frames, or the frame files
        request["video"] = args.video[0] if len(args.video) == 1 and os.path.isdir(args.video[0]) else args.video
    answers = generate_answers(model, tokenizer, [request_to_sample(request, infer, "command line")], proc, infer)
    print(answers["0"])


def _chat_loop(images, model, tokenizer, proc, infer) -> None:
    """Multi-turn chat on stdin: each line is a user turn; the history is kept until EOF. The images
    go before the first turn."""
    from paddle_mm.inference.generate import generate_answers
    from paddle_mm.inference.requests import request_to_sample

    messages: list[dict] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        sample = request_to_sample({"id": "chat", "task": "chat", "images": images, "messages": messages},
                                   infer, "chat")
        answer = generate_answers(model, tokenizer, [sample], proc, infer)["chat"]
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def _eval(args) -> None:
    from paddle_mm.data.readers import read_captions, read_vqav2
    from paddle_mm.eval.tasks import evaluate_captions, evaluate_vqa

    report: dict = {}
    if args.retrieval or args.zero_shot:  # an align or clip run: no language model to answer with
        from paddle_mm.eval.alignment import evaluate_alignment_run
        from paddle_mm.runtime import configure_cpu

        configure_cpu()
        report = evaluate_alignment_run(args.run_dir, args.retrieval, args.zero_shot, args.image_root)
    if args.vqa_questions or args.captions or args.pope or args.chair_scenes:
        recipe, tokenizer, model, proc = _load(args.run_dir)
    if args.vqa_questions:
        kw = {"image_root": args.image_root or None, "prompt_template": recipe.infer.vqa_prompt,
              "video_frames": recipe.data.video_frames}
        if args.image_pattern:
            kw["image_pattern"] = args.image_pattern
        samples = read_vqav2(args.vqa_questions, args.vqa_annotations, **kw).samples
        report["vqa"] = evaluate_vqa(model, tokenizer, samples, proc, recipe.infer, blind=args.blind,
                                     normalize=args.vqa_normalize)
    if args.captions:
        samples = read_captions(args.captions, image_root=args.image_root or None,
                                prompt=recipe.infer.caption_prompt).samples
        report["caption"] = evaluate_captions(model, tokenizer, samples, proc, recipe.infer)
    if args.pope:
        from paddle_mm.data.readers import read_pope
        from paddle_mm.eval.hallucination import evaluate_pope

        samples = read_pope(args.pope, image_root=args.image_root or None).samples
        report["pope"] = evaluate_pope(model, tokenizer, samples, proc, recipe.infer)
    if args.chair_scenes:
        from paddle_mm.eval.hallucination import evaluate_chair

        report["chair"] = evaluate_chair(model, tokenizer, args.chair_scenes, args.chair_split, proc, recipe.infer)
    if not report:
        raise SystemExit("nothing to evaluate: give --vqa-questions/--vqa-annotations, --captions, "
                         "--pope, --chair-scenes, --retrieval or --zero-shot")
    scores = {task: {k: v for k, v in r.items() if k not in ("predictions", "hallucinated_by_caption")}
              for task, r in report.items()}
    print(json.dumps(scores, indent=1))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


def _demo(args) -> None:
    from paddle_mm.demo.pipeline import run_demo

    if args.qformer and args.family != "llava":
        raise SystemExit("paddle-mm demo: --qformer is a LLaVA-family projector; it does not go with --family "
                         f"{args.family}")
    pipeline = "qformer" if args.qformer else {"llava": "mlp"}.get(args.family, args.family)
    run_demo(args.out, quick=args.quick, extra=args.overrides, scale=args.scale, processes=args.processes,
             pipeline=pipeline, multi=args.multi)


def _tokenizer(args) -> None:
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus

    tok = Tokenizer.train_bpe(training_corpus(args.corpus), vocab_size=args.vocab_size)
    print(tok.save(args.out))


def _convert(args) -> None:
    from paddle_mm.weights.convert import convert

    if args.source_format == "paddlemix":
        from paddle_mm.weights.paddlemix import convert_paddlemix

        print(convert_paddlemix(args.src, args.dst, args.family, allow_pickle=args.pdparams, vision=args.vision,
                                image_token_id=args.image_token_id))
        return
    print(convert(args.src, args.dst, args.family))


def _export(args) -> None:
    from paddle_mm.weights.convert import export

    print(export(args.src, args.dst))


def _plot(args) -> None:
    import os

    from paddle_mm.training.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out or os.path.join(args.run_dirs[0], "curves.png")))


def _serve(args) -> None:
    import os

    from paddle_mm.serving.server import ServerLimits, serve

    limits = ServerLimits(max_request_bytes=args.max_request_mb * 2**20, max_image_bytes=args.max_image_mb * 2**20,
                          max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens,
                          max_batch=args.max_batch, join=not args.no_join)
    serve(args.run_dir, host=args.host, port=args.port, model_name=args.model_name,
          local_image_root=args.allow_local_images, limits=limits, num_threads=args.threads,
          allowed_hosts=tuple(args.allow_host), api_key=args.api_key or os.environ.get("PADDLE_MM_API_KEY", ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddle-mm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the training stage a recipe describes")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the recipe")
    p.set_defaults(func=_train)

    p = sub.add_parser("check-data", help="check a recipe's training data; exit 1 past --max-bad-fraction")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the recipe")
    p.add_argument("--max-bad-fraction", type=float, default=0.0,
                   help="fail when more than this fraction of records is unusable (default 0)")
    p.add_argument("--report", default="", help="JSON report path (default: train.output_dir/check_data.json)")
    p.add_argument("--no-decode", action="store_true", help="check that images exist, without decoding them")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("infer", help="answer with a trained run or a Hugging Face LLaVA folder: vqa, caption or chat")
    p.add_argument("run_dir")
    p.add_argument("--task", choices=["vqa", "caption", "chat"], default="vqa")
    p.add_argument("--image", action="append", default=[],
                   help="an image file; repeat it for a question over several images (in that order)")
    p.add_argument("--video", nargs="+", default=[], metavar="FRAMES",
                   help="a clip after the images: a folder of frame files (name order) or the frame files")
    p.add_argument("--video-fps", type=float, default=0.0,
                   help="the clip's frames per second (Qwen2.5-VL's temporal positions; default: the folder's)")
    p.add_argument("--mrope-advance", choices=["max", "extent"], default="",
                   help="Qwen2-VL: the text after a clip starts past its largest position (max: Qwen's code, "
                        "transformers 4.57; the default) or past its start plus its larger side (extent: 5.x)")
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
    # eval.metrics.vqa.NORMALIZE_MODES, spelled out like --family below
    p.add_argument("--vqa-normalize", choices=["official", "symmetric"], default="official",
                   help="official: answers normalized only where the annotators disagree, as the VQA "
                        "evaluation script does (default); symmetric: always normalize both sides")
    p.add_argument("--retrieval", default="", help="captions JSON: recall@1/5/10 both ways (align/clip runs)")
    p.add_argument("--zero-shot", default="", help="zero-shot task JSON: classification accuracy (align/clip runs)")
    p.add_argument("--pope", default="", help="POPE question file (JSONL): accuracy, precision, recall, F1, "
                                              "yes-ratio per setting")
    p.add_argument("--chair-scenes", default="", help="a synthetic demo data folder: CHAIR-s / CHAIR-i of the "
                                                      "model's captions of its scenes")
    p.add_argument("--chair-split", default="test", help="which split's scenes --chair-scenes takes")
    p.add_argument("--output", help="write scores and predictions as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="synthetic data -> pretrain -> instruct -> evaluation, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="the small CI-sized variant")
    p.add_argument("--qformer", action="store_true",
                   help="a Q-Former projector, trained align (ITC/ITM/ITG) -> pretrain -> instruct")
    p.add_argument("--multi", action="store_true",
                   help="also train and evaluate questions over two images and over short clips")
    p.add_argument("--family", choices=("llava", "qwen2-vl"), default="llava",
                   help="llava: the ViT + projector + Qwen2; qwen2-vl: a Qwen2-VL built from scratch "
                        "(images at their own size, patch merger, M-RoPE; not with --qformer)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (a longer run)")
    p.add_argument("--processes", type=int, default=0, help="data-parallel training processes (0: one per core)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both stages")
    p.set_defaults(func=_demo)

    p = sub.add_parser("convert", help="a Hugging Face (or PaddleMIX) checkpoint folder -> a new paddle_mm folder")
    p.add_argument("src")
    p.add_argument("dst", help="a folder that does not exist yet")
    p.add_argument("--from", dest="source_format", choices=["hf", "paddlemix"], default="hf")
    # the names of weights/families.FAMILIES (importing it here would load paddle for --help)
    p.add_argument("--family", required=True, choices=["llava", "clip", "siglip", "qwen2", "llama", "blip2", "qwen2-vl"])
    p.add_argument("--pdparams", action="store_true",
                   help="PaddleMIX only: read model_state.pdparams, a pickle (only from a source you trust)")
    p.add_argument("--vision", default="", help="PaddleMIX only: the CLIP folder, if mm_vision_tower is not local")
    p.add_argument("--image-token-id", type=int, help="PaddleMIX BLIP-2 only: the image token's id in its tokenizer")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="a paddle_mm folder (converted or a trained run) -> a new Hugging Face folder")
    p.add_argument("src")
    p.add_argument("dst", help="a folder that does not exist yet")
    p.add_argument("--to", choices=["hf"], default="hf")
    p.set_defaults(func=_export)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("corpus", nargs="+")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_tokenizer)
    p = sub.add_parser("plot", help="PNG of the loss and learning-rate curves of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png of the first run)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("serve", help="OpenAI-compatible chat server (and a chat page) for a trained run")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="", help="the model id clients name (default: the run folder's name)")
    p.add_argument("--allow-local-images", metavar="DIR", default="",
                   help="also accept image paths (file://) inside DIR; by default only data: URLs")
    p.add_argument("--max-request-mb", type=int, default=16)
    p.add_argument("--max-image-mb", type=int, default=8)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-tokens", type=int, default=512, help="the most new tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=8, help="requests answered together in one generation")
    p.add_argument("--no-join", action="store_true",
                   help="answer batch by batch: no request joins a running generation (lower p95 latency under "
                   "load here, higher median)")
    p.add_argument("--api-key", default="", help="ask /v1/ requests for 'Authorization: Bearer KEY' "
                   "(default: $PADDLE_MM_API_KEY, else no key)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the model (0: every core)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="bound to the loopback, also accept this Host name (a proxy's); repeatable")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except PaddleMMError as e:  # bad input: one readable line, no stack trace
        print(f"paddle-mm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
