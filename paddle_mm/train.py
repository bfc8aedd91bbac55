"""One training entry point for every stage; stages differ by recipe, not by code.

A run folder holds: recipe.yaml (resolved), config.json, tokenizer.json, model.safetensors,
projector.safetensors, metrics.jsonl, and checkpoint/ (weights + optimizer + position) to
continue from. Freezing follows `train.trainable`; the only stage-dependent code is the
choice of model and dataset for the alignment stages (paddle_mm/alignment), which keep
this loop, its batches and its files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np

from paddle_mm import alignment, builder
from paddle_mm.checkpoint import load_into, load_tensors, save_tensors
from paddle_mm.config import Recipe, TrainConfig
from paddle_mm.data.dataset import ConversationDataset, collate
from paddle_mm.errors import CheckpointError, DataError, RecipeError
from paddle_mm.fileio import write_json_atomic
from paddle_mm.recipe import save_recipe
from paddle_mm.tokenizer import dump_special_tokens

# text_tower and align_heads exist in the alignment stages' models only.
SUBMODULES = ("vision_tower", "multi_modal_projector", "language_model", "text_tower", "align_heads")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_trainable(model, cfg: TrainConfig) -> dict[str, list]:
    """Freeze everything outside cfg.trainable; returns the trainable parameters per submodule."""
    present = [name for name in SUBMODULES if getattr(model, name, None) is not None]
    for name in cfg.trainable:
        if name not in present:
            raise RecipeError(f"train.trainable: {name!r} is not one of this stage's {tuple(present)}")
    groups: dict[str, list] = {}
    for name in present:
        params = getattr(model, name).parameters()
        train_it = name in cfg.trainable
        for p in params:
            p.stop_gradient = not train_it
        if train_it:
            groups[name] = params
    if cfg.lora.enabled:
        from paddle_mm.lora import add_lora

        groups["language_model"] = add_lora(model.language_model, cfg.lora)
    return groups


def build_optimizer(groups: dict[str, list], cfg: TrainConfig):
    import paddle

    # Paddle multiplies the base rate by a group's "learning_rate": a ratio here.
    scale = {
        "multi_modal_projector": (cfg.projector_lr or cfg.lr) / cfg.lr,
        "vision_tower": (cfg.vision_lr or cfg.lr) / cfg.lr,
    }
    param_groups = [{"params": ps, "learning_rate": scale.get(name, 1.0)} for name, ps in groups.items() if ps]
    if not param_groups:
        raise RecipeError("train.trainable leaves no parameter to train")
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    return paddle.optimizer.AdamW(
        learning_rate=cfg.lr, parameters=param_groups, weight_decay=cfg.weight_decay, grad_clip=clip
    )


class Progress:
    """One status line per log step: step, loss, learning rate, throughput, time left."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()

    def update(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        done = step - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        print(f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.1f} samples/s eta {eta:.0f}s",
              file=sys.stderr, flush=True)


def _save_weights(run_dir: str, model) -> None:
    save_tensors(model.state_dict(), os.path.join(run_dir, builder.MODEL_FILE))
    if getattr(model, "multi_modal_projector", None) is not None:  # a clip run has none
        save_tensors(model.multi_modal_projector.state_dict(), os.path.join(run_dir, builder.PROJECTOR_FILE))


def save_checkpoint(run_dir: str, model, optimizer, state: dict) -> None:
    """Write checkpoint/ atomically: build it in a temporary folder, then swap it into place."""
    final = os.path.join(run_dir, "checkpoint")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_tensors(model.state_dict(), os.path.join(tmp, builder.MODEL_FILE))
    save_tensors(_optimizer_tensors(optimizer, model), os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)
    old = final + ".old"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# Paddle names optimizer slots after a parameter's generated name ("linear_3.w_0_moment1_0"),
# which differs between processes; on disk they are named after the parameter's path instead.
_SLOT = re.compile(r"^(.*)_(moment1|moment2|beta1_pow_acc|beta2_pow_acc)_(\d+)$")


def _optimizer_tensors(optimizer, model) -> dict:
    path_of = {p.name: n for n, p in model.named_parameters()}
    out = {}
    for key, value in optimizer.state_dict().items():
        match = _SLOT.match(key) if hasattr(value, "numpy") else None
        if match and match.group(1) in path_of:
            out[f"{path_of[match.group(1)]}:{match.group(2)}_{match.group(3)}"] = value
    return out


def _load_optimizer_tensors(optimizer, model, tensors: dict) -> None:
    import paddle

    generated = {n: p.name for n, p in model.named_parameters()}
    state = {}
    for key, value in tensors.items():
        path, slot = key.split(":")
        state[f"{generated[path]}_{slot}"] = paddle.to_tensor(value)
    optimizer.set_state_dict(state)


def load_checkpoint(run_dir: str, model, optimizer) -> dict | None:
    ckpt = os.path.join(run_dir, "checkpoint")
    if not os.path.isfile(os.path.join(ckpt, "state.json")):
        return None
    load_into(model, load_tensors(os.path.join(ckpt, builder.MODEL_FILE)), ckpt)
    _load_optimizer_tensors(optimizer, model, load_tensors(os.path.join(ckpt, "optimizer.safetensors")))
    with open(os.path.join(ckpt, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def _init_weights(model, cfg: TrainConfig) -> None:
    if cfg.init_from:
        path = cfg.init_from
        if os.path.isdir(path):
            path = os.path.join(path, builder.MODEL_FILE)
        load_into(model, load_tensors(path), path)
    if cfg.projector_from:
        load_into(model.multi_modal_projector, load_tensors(cfg.projector_from), cfg.projector_from)
    if cfg.vision_from:  # e.g. the vision tower an align/clip stage trained beside the Q-Former
        path = cfg.vision_from
        if os.path.isdir(path):
            path = os.path.join(path, builder.MODEL_FILE)
        load_into(model.vision_tower, load_tensors(path), path, prefix="vision_tower.")


def write_run_files(run_dir: str, recipe: Recipe, model_cfg, tokenizer) -> None:
    os.makedirs(run_dir, exist_ok=True)
    save_recipe(recipe, os.path.join(run_dir, builder.RECIPE_FILE))
    write_json_atomic(os.path.join(run_dir, "config.json"), asdict(model_cfg))
    tokenizer.save(run_dir)
    dump_special_tokens(run_dir, tokenizer)


def _parallel_context():
    """(rank, world size); joins the process group when started by paddle.distributed."""
    import paddle.distributed as dist

    world = dist.get_world_size()
    if world > 1 and not dist.is_initialized():
        dist.init_parallel_env()
    return dist.get_rank(), world


def train(recipe: Recipe, quiet: bool = False) -> str:
    """Run the training stage the recipe describes; returns the run folder.

    Under paddle.distributed (launch or spawn, gloo on CPU) every process takes its share of
    each global batch of train.batch_size samples and gradients are averaged; only rank 0
    writes files.
    """
    import paddle
    import paddle.distributed as dist

    from paddle_mm.runtime import configure_cpu, seed_everything

    cfg = recipe.train
    rank, world = _parallel_context()
    if cfg.batch_size % world:
        raise RecipeError(f"train.batch_size {cfg.batch_size} does not split over {world} processes")
    configure_cpu(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    seed_everything(cfg.seed)  # the same seed everywhere: every process starts from the same weights
    tokenizer = builder.load_tokenizer(recipe)
    model_cfg = builder.model_config_for(recipe, tokenizer)
    align = cfg.stage in alignment.ALIGN_STAGES
    if align:
        model = alignment.build_align_model(cfg.stage, model_cfg, cfg.seed)
        alignment.init_text_weights(model, model_cfg)
    else:
        model = builder.build_model(model_cfg, tokenizer)
    _init_weights(model, cfg)
    groups = apply_trainable(model, cfg)
    optimizer = build_optimizer(groups, cfg)

    samples, skipped = builder.read_samples(recipe.data.train, recipe)
    if align:
        dataset = alignment.build_dataset(model, samples, recipe)
    else:
        dataset = ConversationDataset(samples, tokenizer, builder.image_processor_for(recipe),
                                      model_cfg.tokens_per_image, recipe.data.max_length, recipe.data.on_error,
                                      recipe.data.system_prompt)
    skipped += dataset.skipped
    if skipped and rank == 0:
        print(f"skipped {len(skipped)} bad records (data.on_error=skip); first: {skipped[0]}", file=sys.stderr)
    if len(dataset) == 0:
        raise RecipeError("data.train yields no usable samples")

    run_dir = cfg.output_dir
    if rank == 0:
        write_run_files(run_dir, recipe, model_cfg, tokenizer)
        if align:
            alignment.save_text_tokenizer(model, run_dir)
    state = load_checkpoint(run_dir, model, optimizer) or {"step": 0, "epoch": 0, "cursor": 0}
    if state["step"] >= cfg.max_steps:
        raise CheckpointError(f"{run_dir}: already trained {state['step']} of max_steps {cfg.max_steps} steps")
    forward = paddle.DataParallel(model) if world > 1 else model

    lengths = np.array([len(item.input_ids) for item in dataset.items])
    order = _epoch_order(cfg.seed, lengths, state["epoch"], cfg.batch_size)
    log = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") if rank == 0 else None
    progress = Progress(cfg.max_steps, state["step"])
    model.train()
    t_log, seen = time.time(), 0
    while state["step"] < cfg.max_steps:
        lr = lr_at(state["step"], cfg)
        optimizer.set_lr(lr)
        total_loss = 0.0
        for micro in range(cfg.grad_accum):
            if state["cursor"] + cfg.batch_size > len(order):
                state["epoch"] += 1
                state["cursor"] = 0
                order = _epoch_order(cfg.seed, lengths, state["epoch"], cfg.batch_size)
            idx = order[state["cursor"]: state["cursor"] + cfg.batch_size]
            state["cursor"] += cfg.batch_size
            seen += len(idx)
            items = _read_items(dataset, idx[rank::world], recipe.data.on_error, skipped)
            if not items:
                continue
            batch = collate(items, tokenizer.pad_token_id)
            # Gradients are averaged across processes once, on the last micro-batch.
            sync = world > 1 and micro < cfg.grad_accum - 1
            with forward.no_sync() if sync else contextlib.nullcontext():
                loss, _ = forward(
                    paddle.to_tensor(batch["input_ids"]),
                    paddle.to_tensor(batch["attention_mask"]),
                    None if batch["pixel_values"] is None else paddle.to_tensor(batch["pixel_values"]),
                    paddle.to_tensor(batch["labels"]),
                )
                (loss / cfg.grad_accum).backward()
            total_loss += float(loss) / cfg.grad_accum
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"non-finite loss {total_loss} at step {state['step']}, samples {batch['ids']}")
        optimizer.step()
        optimizer.clear_grad()
        state["step"] += 1
        step = state["step"]
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if world > 1:  # log the loss of the whole global batch
                total = paddle.to_tensor([total_loss])
                dist.all_reduce(total)
                total_loss = float(total) / world
            rate = seen / max(time.time() - t_log, 1e-9)
            if rank == 0:
                log.write(json.dumps({"step": step, "loss": total_loss, "lr": lr, "samples_per_s": rate}) + "\n")
                log.flush()
                if not quiet:
                    progress.update(step, total_loss, lr, rate)
            t_log, seen = time.time(), 0
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            _checkpoint_on_rank0(run_dir, model, optimizer, state, rank, world)
    if rank == 0:
        log.close()
        write_json_atomic(os.path.join(run_dir, "skipped.json"),
                          {"count": len(skipped), "records": [str(e) for e in skipped[:100]]})
        _save_weights(run_dir, model)
    _checkpoint_on_rank0(run_dir, model, optimizer, state, rank, world)
    return run_dir


def _checkpoint_on_rank0(run_dir, model, optimizer, state, rank, world) -> None:
    if rank == 0:
        save_checkpoint(run_dir, model, optimizer, dict(state))
    if world > 1:
        import paddle.distributed as dist

        dist.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume


def train_in_processes(recipe: Recipe, processes: int, quiet: bool = False) -> str:
    """Data-parallel training in `processes` local processes (gloo on CPU); returns the run folder."""
    if processes <= 1:
        return train(recipe, quiet)
    import paddle.distributed as dist

    dist.spawn(_spawned_train, args=(recipe, quiet), nprocs=processes, backend="gloo" if _on_cpu() else "auto")
    return recipe.train.output_dir


def _spawned_train(recipe: Recipe, quiet: bool) -> None:
    """A spawned worker: train, wait for every rank, then leave without running destructors.

    Once in a while rank 0 aborted (SIGABRT) while tearing down the gloo context at exit,
    after every file was written (seen once in a 500-step demo stage, not in 30- or 400-step
    repeats); the run is complete by then, so the worker exits directly.
    """
    import paddle.distributed as dist

    train(recipe, quiet)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _on_cpu() -> bool:
    import paddle

    return paddle.device.get_device() == "cpu"


def _read_items(dataset, idx, on_error: str, skipped: list) -> list[dict]:
    """Dataset items of a batch; an unreadable image stops the run or is skipped and counted."""
    items = []
    for i in idx:
        try:
            items.append(dataset[int(i)])
        except DataError as err:
            if on_error == "raise":
                raise
            skipped.append(err)
            print(f"skipped: {err}", file=sys.stderr)
    return items


def _epoch_order(seed: int, lengths: np.ndarray, epoch: int, batch_size: int) -> np.ndarray:
    """The sample order of an epoch, batched by similar length.

    Shuffle, then sort by length inside windows of 16 batches and shuffle the batches: a
    batch pads to its longest sample, and mixing 45-token captions with 130-token
    conversations wasted about a third of each step. Depends only on (seed, epoch), so a
    resumed run sees the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = 16 * batch_size
    for start in range(0, len(order), window):
        chunk = order[start: start + window]
        order[start: start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))]) if batches else order
