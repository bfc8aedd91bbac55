"""Reference outputs of transformers' whole user pipeline, for folders as users download them.

Run by hand, once with each transformers version, each in its own venv with torch (the tests
import neither):
    python tools/make_pipeline_fixtures.py --tag hf457   # transformers 4.57
    python tools/make_pipeline_fixtures.py --tag hf5     # transformers 5.x
Each model gets tests/fixtures/reference/pipeline/<model>/<tag>/: the folder save_pretrained
writes (weights, config, tokenizer, chat template, image processor settings) and
reference.safetensors + reference.json with what the pipeline made of the images in
pipeline/images/ and one question: the rendered prompt, input_ids, pixel_values, logits, the
greedy tokens of generate(), and for a two-turn conversation the assistant mask transformers
computes from the template's {% generation %} marks.

Models: llava_llama (LLaVA-1.5: "USER: <image>\\n... ASSISTANT:", a tokenizer that adds a BOS,
LlavaImageProcessor padding to a square with the mean colour, CLIP tower, Llama LM);
llava_qwen2 (a ChatML processor template with a default system turn, CLIPImageProcessor with a
shortest-edge resize larger than its centre crop, Qwen2 LM with tied embeddings); qwen2 and
llama (text-only LMs and their tokenizers' templates, through tokenizer.apply_chat_template).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from make_reference_fixtures import perturb_, save_reference, transformers_module  # noqa: E402

GREEDY_STEPS = 16
ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference", "pipeline")
IMAGES = {"wide.png": (45, 30), "tall.png": (23, 50), "square.png": (32, 32)}
QUESTION = "what colour is the circle?"
CONVERSATION = [("user", QUESTION), ("assistant", "the circle is red"), ("user", "and the square?"),
                ("assistant", "blue")]
CORPUS = ["a red circle left of a blue square", "what colour is the circle?", "the square is blue",
          "and the square?", "the circle is red", "USER: ASSISTANT: system user assistant"] * 20

LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_PARTS_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ part['text'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TEXT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def write_noise_images(folder: str, sizes: dict, rng) -> None:
    """Noise PNGs (every resize filter differs on noise) of {file name: (width, height)}, drawn from rng in order."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, name))


def make_images() -> None:
    """The pipeline fixtures' noise images, drawn from a fixed seed."""
    import numpy as np

    write_noise_images(os.path.join(ROOT, "images"), IMAGES, np.random.default_rng(0))


def _tokenizer(tf, specials: list[str], bos: str | None, eos: str, pad: str, add_bos: bool, template: str):
    """A byte-level BPE (trained on CORPUS) as a transformers fast tokenizer."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=specials,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:  # Llama's tokenizers put a BOS before every text they encode with special tokens
        tok.post_processor = tk.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                              special_tokens=[(bos, tok.token_to_id(bos))])
    kw = {"bos_token": bos} if bos else {}
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                      model_input_names=["input_ids", "attention_mask"], **kw)
    fast.chat_template = template
    return fast


def _greedy(model, **inputs):
    import torch

    out = model.generate(**inputs, max_new_tokens=GREEDY_STEPS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    gaps = [torch.topk(s.float(), 2, dim=-1).values for s in out.scores]
    smallest = min(float((g[:, 0] - g[:, 1]).min()) for g in gaps)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    print(f"    {len(new)} greedy tokens, smallest top-1/top-2 gap {smallest:.4f}")
    return new


def _lm_config(tf, family: str, vocab: int, special_ids: dict):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **special_ids)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6)
    return tf.LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _vocab(tok) -> int:
    return -(-len(tok) // 64) * 64


def make_llava(tf, name: str, tag: str) -> None:
    import torch
    from PIL import Image

    folder = os.path.join(ROOT, name, tag)
    if name == "llava_llama":
        tok = _tokenizer(tf, ["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>", True, LLAVA15_TEMPLATE)
        ip = tf.LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        template, family = LLAVA15_TEMPLATE, "llama"
    else:
        tok = _tokenizer(tf, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], None, "<|im_end|>",
                         "<|endoftext|>", False, CHATML_PARTS_TEMPLATE)
        ip = tf.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
        template, family = CHATML_PARTS_TEMPLATE, "qwen2"
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=32, patch_size=8, hidden_act="quick_gelu", initializer_range=0.2)
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    config = tf.LlavaConfig(vision_config=vision, text_config=_lm_config(tf, family, _vocab(tok), special),
                            image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu", image_seq_length=16)
    model = tf.LlavaForConditionalGeneration(config).eval()
    perturb_(model, seed=11, scale=0.1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, chat_template=template,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    refs, prompts = {}, {}
    for image_name in IMAGES:
        image = Image.open(os.path.join(ROOT, "images", image_name))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        print(f"  {name} {tag} {image_name}:")
        key = image_name.split(".")[0]
        prompts[key] = prompt
        refs.update({f"{key}.input_ids": inputs["input_ids"][0], f"{key}.pixel_values": inputs["pixel_values"][0],
                     f"{key}.logits": logits[0], f"{key}.greedy": _greedy(model, **inputs)})
    # The assistant mask of a two-turn conversation with an image, as transformers computes it.
    conv = [{"role": r, "content": ([{"type": "image", "path": os.path.join(ROOT, "images", "wide.png")}] if k == 0 else [])
             + [{"type": "text", "text": t}]} for k, (r, t) in enumerate(CONVERSATION)]
    out = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt")
    refs["conversation.input_ids"] = out["input_ids"][0]
    refs["conversation.assistant_masks"] = torch.as_tensor(out["assistant_masks"]).reshape(-1)
    save_reference(folder, refs)
    with open(os.path.join(folder, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": tf.__version__, "question": QUESTION, "prompts": prompts,
                   "conversation": CONVERSATION}, f, indent=1)


def make_text_lm(tf, name: str, tag: str) -> None:
    import torch

    folder = os.path.join(ROOT, name, tag)
    if name == "qwen2":
        tok = _tokenizer(tf, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                         False, CHATML_TEXT_TEMPLATE)
    else:
        tok = _tokenizer(tf, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|finetune_pad|>"], "<|begin_of_text|>", "<|eot_id|>", "<|finetune_pad|>", True,
                         LLAMA3_TEMPLATE)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    cls = tf.Qwen2ForCausalLM if name == "qwen2" else tf.LlamaForCausalLM
    model = cls(_lm_config(tf, name, _vocab(tok), special)).eval()
    perturb_(model, seed=12, scale=0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(f"  {name} {tag}:")
    greedy = _greedy(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    conv = [{"role": r, "content": t} for r, t in CONVERSATION]
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    save_reference(folder, {"input_ids": ids[0], "logits": logits[0], "greedy": greedy,
                            "conversation.input_ids": torch.tensor(out["input_ids"]),
                            "conversation.assistant_masks": torch.tensor(out["assistant_masks"])})
    with open(os.path.join(folder, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": tf.__version__, "question": QUESTION, "prompt": prompt,
                   "conversation": CONVERSATION}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="hf457 or hf5: the subfolder each model is written to")
    args = parser.parse_args()
    tf = transformers_module()
    make_images()
    for name in ("llava_llama", "llava_qwen2"):
        make_llava(tf, name, args.tag)
    for name in ("qwen2", "llama"):
        make_text_lm(tf, name, args.tag)


if __name__ == "__main__":
    main()
