"""WordPiece text tokenization for the alignment stages (BERT's vocab.txt layout).

The Q-Former is a BERT, so its text side reads BERT's uncased WordPiece vocabulary; BLIP-2
appends one token, [DEC], that replaces [CLS] at the start of the generation (ITG) input.
A vocabulary without [DEC] gets it appended here, as BLIP-2 does (30522 -> 30523 for
bert-base-uncased).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from paddle_mm.errors import CheckpointError

VOCAB_FILE = "vocab.txt"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC = "[DEC]"


def vocab_path(path: str) -> str:
    """A vocab.txt file, or the one inside a folder (a BERT checkpoint folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, VOCAB_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: WordPiece vocabulary not found (a vocab.txt, or a folder holding one)")
    return path


class TextTokenizer:
    """Lower-cased WordPiece: text -> [CLS] ... [SEP] ids, cut at max_length."""

    def __init__(self, vocab_file: str):
        from tokenizers import BertWordPieceTokenizer

        self.vocab_file = vocab_path(vocab_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        missing = [t for t in SPECIAL if t not in vocab]
        if missing:
            raise CheckpointError(f"{self.vocab_file}: special tokens missing: {', '.join(missing)}")
        self._tok = BertWordPieceTokenizer(self.vocab_file, lowercase=True)
        if self._tok.token_to_id(DEC) is None:
            self._tok.add_special_tokens([DEC])
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self.cls_token_id = self._tok.token_to_id("[CLS]")
        self.sep_token_id = self._tok.token_to_id("[SEP]")
        self.dec_token_id = self._tok.token_to_id(DEC)
        self.base_vocab_size = len(vocab)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = self._tok.encode(text).ids  # [CLS] ... [SEP]
        if len(ids) > max_length:  # keep [SEP] last, as BERT's truncation does
            ids = ids[: max_length - 1] + [self.sep_token_id]
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    @classmethod
    def train(cls, texts: Iterable[str], folder: str, vocab_size: int = 300) -> TextTokenizer:
        """Train a WordPiece vocabulary on texts, write folder/vocab.txt, and load it."""
        from tokenizers import BertWordPieceTokenizer

        tok = BertWordPieceTokenizer(lowercase=True)
        tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                                special_tokens=list(SPECIAL) + [DEC])
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".vocab-{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        written = tok.save_model(tmp)[0]
        os.replace(written, os.path.join(folder, VOCAB_FILE))
        os.rmdir(tmp)
        return cls(folder)
