"""An OpenAI-compatible chat server for a trained run, and the chat page it serves.

openai_api.py turns a chat-completions request into a paddle_mm Sample plus decoding settings
(and every way a request can be wrong into an OpenAI-style error); server.py is the HTTP side.
"""
