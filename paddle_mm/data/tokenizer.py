"""BPE tokenization (HF `tokenizers` as the engine) and the chat template.

One `Tokenizer` class serves a BPE trained here, a backbone's own tokenizer.json (Qwen2 and
Llama folders ship one) and a word-level vocabulary for tests. Models trained here from
scratch use ChatML, the template Qwen2 was trained with:

    <|im_start|>user\n<image>\nwhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n

Labels cover the assistant's text and its closing <|im_end|> (so the model learns to stop);
everything else, the user turns and the image span included, is IGNORE_INDEX.

A checkpoint folder that brings its own chat template (data/chat_template.py) is prompted and
trained in that one instead: the text is rendered as transformers renders it, tokenized in one
piece, each <image> widened to the image's positions, and the assistant messages' characters
labelled through the tokens' offsets.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

from paddle_mm.data.chat_template import TEMPLATE_FILE, ChatTemplate, special_token_strings
from paddle_mm.errors import CheckpointError, DataError
from paddle_mm.fileio import read_json_object, write_json_atomic, write_text_atomic

IGNORE_INDEX = -100
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
# Beside tokenizer.json when a checkpoint template is used: its special tokens and the ids that end an answer.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHATML = "chatml"
# No chat at all, as BLIP-2's processor prompts: every image's tokens, then the text as the
# tokenizer encodes it (with its special tokens: OPT's leading </s>).
PLAIN = "plain"
IMAGE_TOKEN = "<image>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_TOKEN]
ROLES = ("system", "user", "assistant")


def _engine():
    try:
        import tokenizers
    except ImportError as e:  # a hard dependency, but say which package when it is missing
        raise ImportError("paddle_mm needs the 'tokenizers' package: pip install tokenizers") from e
    return tokenizers


class Tokenizer:
    """Three prompt formats: ChatML (template None, plain False: models trained here), a
    checkpoint's ChatTemplate (with its special tokens: bos/eos/pad strings), or plain (BLIP-2:
    no chat; special_tokens from the folder). stop_ids end an answer: ChatML's <|im_end|>, else
    generation_config.json's eos_token_id, else the tokenizer's eos."""

    def __init__(self, engine_tokenizer, template: ChatTemplate | None = None, stop_ids: Sequence[int] = (),
                 plain: bool = False, special_tokens: dict[str, str] | None = None):
        self._tok = engine_tokenizer
        self.template = template
        self.plain = plain
        # Backbone tokenizers may lack <image>; adding it is how LLaVA extends them too. A checkpoint
        # with its own template gets nothing else: its vocabulary must stay the model's.
        chatml = template is None and not plain
        wanted = SPECIAL_TOKENS if chatml else [IMAGE_TOKEN]
        missing = [t for t in wanted if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        self.image_token_id = self._tok.token_to_id(IMAGE_TOKEN)
        self.im_start_id = self._tok.token_to_id(IM_START)
        self.im_end_id = self._tok.token_to_id(IM_END)
        special = template.special_tokens if template is not None else dict(special_tokens or {})
        self.eos_token_id = self._id_of(special.get("eos_token", EOS))
        self.bos_token_id = self._id_of(special["bos_token"]) if "bos_token" in special else self.eos_token_id
        # padding is masked out; any id will do, as in Qwen2
        self.pad_token_id = self._id_of(special["pad_token"]) if "pad_token" in special else self.eos_token_id
        if chatml:
            self.stop_ids = [self.im_end_id]
        else:
            self.stop_ids = list(dict.fromkeys(list(stop_ids) or [self.eos_token_id]))

    def _id_of(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            raise CheckpointError(f"the special token {token!r} is not in the tokenizer's vocabulary")
        return found

    # construction -------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on an iterable of texts (the demo's corpus)."""
        tk = _engine()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=False,
        )
        # The role names of the chat template appear in every sample: make them whole tokens.
        headers = [f"{role}\n" for role in ROLES] * max(min_frequency, 1) * 50
        tok.train_from_iterator(itertools.chain(texts, headers), trainer=trainer)
        return cls(tok)

    @classmethod
    def word_level(cls, words: Sequence[str]) -> Tokenizer:
        """A whitespace word-level vocabulary, for tests and worked examples."""
        tk = _engine()
        vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + ["<unk>"] + list(words))}
        tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        return cls(tok)

    @classmethod
    def load(cls, path: str, chat_template: str = "") -> Tokenizer:
        """Load a tokenizer.json file, or a folder (a run or a checkpoint) that holds one.

        chat_template: "" uses the folder's own template when it has one (ChatML otherwise),
        "chatml" always ChatML, "plain" no chat (BLIP-2), anything else names a Jinja template file.
        """
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no tokenizer.json found")
        try:
            engine = _engine().Tokenizer.from_file(file)
        except Exception as e:  # the engine raises a bare Exception on malformed JSON
            raise CheckpointError(f"{file}: cannot load tokenizer: {e}") from e
        if chat_template == CHATML:
            return cls(engine)
        if chat_template == PLAIN:
            return cls(engine, stop_ids=_stop_ids(folder), plain=True, special_tokens=special_token_strings(folder))
        if chat_template:
            if not os.path.isfile(chat_template):
                raise CheckpointError(f"data.chat_template: {chat_template}: no such template file")
            with open(chat_template, encoding="utf-8") as f:
                template = ChatTemplate(f.read(), chat_template, special_token_strings(folder))
        else:
            template = ChatTemplate.from_folder(folder)
        return cls(engine) if template is None else cls(engine, template, _stop_ids(folder))

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, TOKENIZER_FILE)
        tmp = file + ".tmp"
        self._tok.save(tmp)
        os.replace(tmp, file)
        if self.template is not None:  # the template and its tokens travel with the tokenizer
            write_text_atomic(os.path.join(folder, TEMPLATE_FILE), self.template.text)
            write_json_atomic(os.path.join(folder, TOKENIZER_CONFIG_FILE), self.template.special_tokens)
            write_json_atomic(os.path.join(folder, GENERATION_CONFIG_FILE), {"eos_token_id": self.stop_ids})
        return file

    # encoding -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> dict[str, int]:
        return {"eos": self.eos_token_id, "pad": self.pad_token_id, "bos": self.bos_token_id}

    # chat template ------------------------------------------------------------------------
    def _expand_images(self, text: str, sizes: _ImageSizes) -> list[int]:
        """Encode text; each <image> becomes its image's count of image token ids."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.extend([self.image_token_id] * sizes.next())
            if piece:
                ids.extend(self.encode(piece))
        return ids

    def encode_chat(
        self,
        turns: Sequence[tuple[str, str]],
        tokens_per_image: int | Sequence[int],
        system: str = "",
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation in the tokenizer's chat template.

        tokens_per_image: every image's token count (a ViT's fixed one), or each image's own, in
        the order of the <image> tags (an encoder whose count follows the image's size).
        With add_generation_prompt the ids end with an open assistant header, ready for
        generation (pass the turns up to the user's last one).
        """
        for role, text in turns:
            if role not in ROLES:
                raise DataError("<conversation>", f"unknown role {role!r}; expected one of {ROLES}")
            if not isinstance(text, str):
                raise DataError("<conversation>", f"{role} turn text must be a string, got {type(text).__name__}")
            if role == "assistant" and IMAGE_TOKEN in text:
                # Its image tokens would be labelled: the model trained to write image placeholders.
                raise DataError("<conversation>", f"an assistant turn holds an {IMAGE_TOKEN} tag; images go in "
                                "user or system turns")
        sizes = _ImageSizes(tokens_per_image)
        if self.template is not None:
            out = self._encode_templated(turns, sizes, system, add_generation_prompt)
        elif self.plain:
            out = self._encode_plain(turns, sizes)
        else:
            out = self._encode_chatml(turns, sizes, system, add_generation_prompt)
        sizes.finish()
        return out

    def _encode_chatml(self, turns, sizes: _ImageSizes, system: str, add_generation_prompt: bool):
        ids: list[int] = []
        labels: list[int] = []
        messages = ([("system", system)] if system else []) + list(turns)
        for role, text in messages:
            header = [self.im_start_id] + self.encode(role + "\n")
            body = self._expand_images(text, sizes) + [self.im_end_id]
            newline = self.encode("\n")
            ids += header + body + newline
            if role == "assistant":
                labels += [IGNORE_INDEX] * len(header) + body + [IGNORE_INDEX] * len(newline)
            else:
                labels += [IGNORE_INDEX] * (len(header) + len(body) + len(newline))
        if add_generation_prompt:
            ids += [self.im_start_id] + self.encode("assistant\n")
            labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        return ids, labels

    def _encode_plain(self, turns, sizes: _ImageSizes):
        """Each user turn: its images' tokens, then its text (the first with the tokenizer's special
        tokens); each assistant turn: its text and eos, labelled."""
        ids: list[int] = []
        labels: list[int] = []
        first = True
        for role, text in turns:
            body = text.replace(IMAGE_TOKEN, "").strip()
            if role == "assistant":
                piece = self.encode(body) + [self.eos_token_id]
                ids += piece
                labels += piece
                continue
            piece = [self.image_token_id] * sum(sizes.next() for _ in range(text.count(IMAGE_TOKEN)))
            piece += self._tok.encode(body, add_special_tokens=first).ids if body or first else []
            first = False
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        return ids, labels

    def _encode_templated(self, turns, sizes: _ImageSizes, system: str, add_generation_prompt: bool):
        template = self.template
        if add_generation_prompt:
            text, spans = template.render(turns, system, add_generation_prompt=True), []
        else:
            text, spans = template.assistant_spans(turns, system)
        # transformers' processors add the tokenizer's special tokens unless the text already starts
        # with bos; its tokenizers (text-only templates) never add them.
        bos = template.special_tokens.get("bos_token")
        add_special = template.parts and not (bos and text.startswith(bos))
        encoding = self._tok.encode(text, add_special_tokens=add_special)
        ids: list[int] = []
        labels: list[int] = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            if token == self.image_token_id:
                n = sizes.next()
                ids += [token] * n
                labels += [IGNORE_INDEX] * n
                continue
            ids.append(token)
            inside = end > start and any(start < e and end > s for s, e in spans)
            labels.append(token if inside else IGNORE_INDEX)
        return ids, labels


class _ImageSizes:
    """Each image's token count in reading order: one count for every image, or one per image
    (then the text must hold exactly that many images)."""

    def __init__(self, tokens_per_image: int | Sequence[int]):
        self.each = None if isinstance(tokens_per_image, int) else [int(n) for n in tokens_per_image]
        self.fixed = tokens_per_image if self.each is None else 0
        self.used = 0

    def next(self) -> int:
        self.used += 1
        if self.each is None:
            return self.fixed
        if self.used > len(self.each):
            raise DataError("<conversation>", f"the text holds more images than the {len(self.each)} token counts "
                            "given", reason="tag_mismatch")
        return self.each[self.used - 1]

    def finish(self) -> None:
        if self.each is not None and self.used != len(self.each):
            raise DataError("<conversation>", f"the text holds {self.used} images but {len(self.each)} token counts "
                            "were given", reason="tag_mismatch")


def _stop_ids(folder: str) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list), what transformers' generate stops on."""
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    value = read_json_object(path, lambda reason: CheckpointError(f"{path}: {reason}")).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def training_corpus(paths: Sequence[str]) -> list[str]:
    """Lines of plain-text corpus files, for train_bpe."""
    lines: list[str] = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    return lines


def dump_special_tokens(folder: str, tok: Tokenizer) -> None:
    """Record the ids the model relies on beside tokenizer.json, for people reading a run folder."""
    write_json_atomic(os.path.join(folder, SPECIAL_TOKENS_FILE),
                      {"image_token_id": tok.image_token_id, "eos_token_id": tok.eos_token_id,
                       "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id})
