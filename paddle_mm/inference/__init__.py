"""Inference: generate_answers (the primitive the CLI, the chat loop, the server and the
evaluations call) and batch JSONL requests."""
