"""Shared by the align and clip stage tests: 300 train / 50 test synthetic scenes with a BPE
tokenizer (the LM side) and a WordPiece vocabulary (the text tower), made once per session."""
import pytest


@pytest.fixture(scope="session")
def caption_pairs(tmp_path_factory):
    from paddle_mm.alignment.text import TextTokenizer
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus

    root = tmp_path_factory.mktemp("caption_pairs")
    files = generate_demo_data(str(root / "data"), 300, 4, 50, seed=0)
    corpus = training_corpus([files["corpus"]])
    Tokenizer.train_bpe(corpus, vocab_size=300).save(str(root / "tok"))
    TextTokenizer.train(corpus, str(root / "wp"), vocab_size=200)
    return root
