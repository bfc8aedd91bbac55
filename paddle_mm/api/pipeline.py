"""`load` and `Pipeline`: a model with its tokenizer, chat template and image processor, answering
questions about images, captioning them and chatting, in a few calls.

Images may be paths, PIL images or HxWx3 uint8 arrays. Generation settings are keyword
arguments: max_new_tokens, temperature (0: greedy), top_p, num_beams, stop (strings that end the
answer, not included), on_text (called with each new piece of the answer as it is decoded).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple, Union

import numpy as np

from paddle_mm.data.readers import Sample, visual_prompt
from paddle_mm.data.tokenizer import IMAGE_TOKEN

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821 (PIL is imported lazily)


def _image(image):
    """A path stays a path (the image processor reads and checks it); arrays become PIL images."""
    if isinstance(image, np.ndarray):
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    return os.fspath(image) if isinstance(image, os.PathLike) else image


class Settings(NamedTuple):
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    num_beams: int | None
    stop: Sequence[str]
    on_text: Callable[[str], None] | None


class Pipeline:
    """What `load` returns. Attributes: recipe, tokenizer, model, image_processor (the parts, for
    those who need them); the methods below are the public way to use them."""

    def __init__(self, recipe, tokenizer, model, image_processor):
        self.recipe, self.tokenizer, self.model, self.image_processor = recipe, tokenizer, model, image_processor

    def answer(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str],
               *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, num_beams: int | None = None, stop: Sequence[str] = (),
               on_text: Callable[[str], None] | None = None) -> str | list[str]:
        """Answer one question (a str back) about one image or a list of images (several blocks of
        image tokens, in that order), or a list of questions (a list back), each with its own image
        or list of images; worded through the recipe's infer.vqa_prompt as in training, its <image>
        standing for all of a question's images."""
        single = isinstance(questions, str)
        images, questions = ([images], [questions]) if single else (list(images), list(questions))
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        groups = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        template = self.recipe.infer.vqa_prompt
        turns = [[("user", visual_prompt(template, len(g)).format(question=q.strip()))]
                 for g, q in zip(groups, questions)]
        out = self._generate(groups, turns, "", Settings(max_new_tokens, temperature, top_p, num_beams, stop, on_text))
        return out[0] if single else out

    def caption(self, images: ImageLike | Sequence[ImageLike], *, max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, num_beams: int | None = None, stop: Sequence[str] = (),
                on_text: Callable[[str], None] | None = None) -> str | list[str]:
        """A caption of one image (a str back) or of each image of a list (a list back)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        turns = [[("user", self.recipe.infer.caption_prompt)] for _ in images]
        out = self._generate([[im] for im in images], turns, "", Settings(max_new_tokens, temperature, top_p,
                                                                          num_beams, stop, on_text))
        return out[0] if single else out

    def chat(self, messages: Sequence[dict | tuple[str, str]], images: Sequence[ImageLike] = (), system: str = "",
             *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, num_beams: int | None = None, stop: Sequence[str] = (),
             on_text: Callable[[str], None] | None = None) -> str:
        """The next assistant turn of a conversation: messages as {"role", "content"} dicts or
        (role, text) pairs, user and assistant alternating, the last one the user's. Each image
        goes where a "<image>" tag stands in the text (in order); with no tags, all of them before the
        first message."""
        turns = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
        if not turns or turns[-1][0] != "user":
            raise ValueError("the last message must be the user's")
        images = list(images)
        tags = sum(text.count(IMAGE_TOKEN) for _, text in turns)
        if images and tags == 0:
            turns[0] = (turns[0][0], visual_prompt(turns[0][1], len(images)))
        elif tags != len(images):
            raise ValueError(f"{tags} {IMAGE_TOKEN} tags but {len(images)} images")
        settings = Settings(max_new_tokens, temperature, top_p, num_beams, stop, on_text)
        return self._generate([images], [turns], system or self.recipe.data.system_prompt, settings)[0]

    def _generate(self, images: list[list], turns: list[list[tuple[str, str]]], system: str,
                  settings: Settings) -> list[str]:
        from paddle_mm.inference.generate import generate_answers
        from paddle_mm.inference.streaming import StopGeneration, TextStream

        infer = replace(self.recipe.infer)  # the recipe's settings, where the call names none
        if settings.max_new_tokens is not None:
            infer.max_new_tokens = settings.max_new_tokens
        if settings.temperature is not None:
            infer.do_sample, infer.temperature = settings.temperature > 0, max(settings.temperature, 1e-5)
        if settings.top_p is not None:
            infer.top_p = settings.top_p
        if settings.num_beams is not None:
            infer.num_beams = settings.num_beams
        stop, on_text = list(settings.stop), settings.on_text
        samples = [Sample(id=str(k), images=[_image(im) for im in ims], turns=t, source="paddle_mm.api", index=k)
                   for k, (ims, t) in enumerate(zip(images, turns))]
        if not stop and on_text is None:
            answers = generate_answers(self.model, self.tokenizer, samples, self.image_processor, infer, system=system)
            return [answers[s.id] for s in samples]
        if infer.num_beams > 1:
            raise ValueError("stop strings and on_text stream tokens as they are chosen: not with beam search")
        out = []
        for sample in samples:  # one at a time: each answer streams and stops on its own
            stream = TextStream(self.tokenizer, stop, on_text)
            try:
                generate_answers(self.model, self.tokenizer, [sample], self.image_processor, infer, system=system,
                                 on_token=lambda _id, token: stream.add(token))
            except StopGeneration:
                pass
            out.append(stream.finish())
        return out


def load(path: str) -> Pipeline:
    """The model of a run folder trained here, a folder `paddle-mm convert` wrote, or a Hugging Face
    LLaVA / BLIP-2 folder as downloaded, in eval mode, with its tokenizer, chat template and image
    processor settings."""
    from paddle_mm.builder import image_processor_for
    from paddle_mm.run_folder import load_run
    from paddle_mm.runtime import configure_cpu

    configure_cpu()
    recipe, _, tokenizer, model = load_run(path)
    return Pipeline(recipe, tokenizer, model, image_processor_for(recipe))
