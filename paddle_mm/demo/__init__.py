"""The demo: synthetic scenes, a tokenizer, the training stages and the held-out evaluation,
from the bundled recipes."""
