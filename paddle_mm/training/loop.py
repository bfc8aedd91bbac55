"""The one training loop, the same for every stage; `train.stage` picks its objective.

What differs between stages (the model to build, the dataset, the loss and its weighting) is
the objective's (training/objectives.py). Freezing follows `train.trainable`
(training/optim.py). The run folder it writes is described in paddle_mm/run_folder.py;
checkpoints and exact resume are training/checkpoints.py.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from paddle_mm import builder, run_folder
from paddle_mm.config import Recipe, TrainConfig
from paddle_mm.errors import CheckpointError, RecipeError
from paddle_mm.training import checkpoints, distributed, validation
from paddle_mm.training.batches import (
    DataCursor,
    first_readable,
    item_targets,
    labelled_tokens,
    read_items,
    sample_ref,
)
from paddle_mm.training.nonfinite import NonFiniteGuard
from paddle_mm.training.objectives import objective_for
from paddle_mm.training.optim import apply_trainable, build_optimizer, lr_at
from paddle_mm.training.runlog import (
    Progress,
    RunLog,
    add_to_interval,
    global_grad_norm,
    take_interval_mean,
    take_interval_sums,
)
from paddle_mm.weights.hf import whole_model_type
from paddle_mm.weights.tensor_files import load_into, load_tensors


def _init_weights(model, cfg: TrainConfig) -> None:
    """Start from the weights of earlier runs the recipe names (train.init_from, projector_from, vision_from)."""
    if cfg.init_from and whole_model_type(cfg.init_from) == "llava":
        from paddle_mm.weights.llava import load_llava  # a Hugging Face LLaVA folder as downloaded

        load_llava(model, cfg.init_from)
    elif cfg.init_from:
        path = run_folder.weights_file(cfg.init_from)
        load_into(model, load_tensors(path), path)
    if cfg.projector_from:
        load_into(model.multi_modal_projector, load_tensors(cfg.projector_from), cfg.projector_from)
    if cfg.vision_from:  # e.g. the vision tower an align/clip stage trained beside the Q-Former
        path = run_folder.weights_file(cfg.vision_from)
        load_into(model.vision_tower, load_tensors(path), path, prefix="vision_tower.")


def _check_recipe(recipe: Recipe, objective) -> None:
    distributed.check_settings(recipe)
    if recipe.data.packing and 0 < recipe.data.pack_length < recipe.data.max_length:
        raise RecipeError(f"data.pack_length {recipe.data.pack_length} is shorter than data.max_length "
                          f"{recipe.data.max_length}: a sample of max_length would fit no packed row")
    objective.check(recipe)
    validation.check(recipe)


def train(recipe: Recipe, quiet: bool = False) -> str:
    """Run the training stage the recipe describes; returns the run folder.

    Under paddle.distributed (launch or spawn, gloo on CPU) every process takes its share of
    each global batch of train.batch_size samples; only rank 0 writes files. A next-token
    step's loss is the mean over the labelled tokens of the whole global batch (every process
    and micro-batch), so N processes give the parameters one process with the same global
    batch gives.
    """
    from paddle_mm.runtime import configure_cpu, copying_views, seed_everything

    cfg = recipe.train
    objective = objective_for(cfg.stage)
    _check_recipe(recipe, objective)
    rank, world = distributed.join_process_group(cfg)
    if cfg.batch_size % world:
        raise RecipeError(f"train.batch_size {cfg.batch_size} does not split over {world} processes")
    configure_cpu(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    seed_everything(cfg.seed)  # the same seed everywhere: every process starts from the same weights

    # The model, what trains, and the data.
    tokenizer = builder.load_tokenizer(recipe)
    model_cfg = builder.model_config_for(recipe, tokenizer)
    model = objective.build_model(recipe, model_cfg, tokenizer)
    _init_weights(model, cfg)
    if cfg.recompute:
        distributed.enable_recompute(model)
    groups = apply_trainable(model, cfg)
    optimizer = build_optimizer(groups, cfg)
    samples, skipped = builder.read_samples(recipe.data.train, recipe)
    dataset = objective.build_dataset(model, samples, recipe, tokenizer, model_cfg)
    skipped += dataset.skipped
    if skipped and rank == 0:
        print(f"skipped {len(skipped)} bad records (data.on_error=skip); first: {skipped[0]}", file=sys.stderr)
    if len(dataset) == 0:
        raise RecipeError("data.train yields no usable samples")
    validator = validation.build_validator(recipe, objective, model, tokenizer, model_cfg, rank, world)

    # The run folder, and where an earlier attempt of this run stopped.
    run_dir = cfg.output_dir
    if rank == 0:
        run_folder.write_run_files(run_dir, builder.with_image_settings(recipe), model_cfg, tokenizer, objective.text_vocab(model))
        checkpoints.clean_leftovers(run_dir)
    state, ckpt = checkpoints.load_latest(run_dir, model, optimizer)
    state = state or {"step": 0, "epoch": 0, "cursor": 0}
    if state["step"] >= cfg.max_steps:
        return _finished_before(run_dir, ckpt, state["step"], cfg.max_steps, rank, world)
    if ckpt and rank == 0:
        print(f"resuming from checkpoint {ckpt} at step {state['step']}", file=sys.stderr)
    forward, stepper = distributed.parallelize(model, optimizer, cfg, world)
    precision = distributed.Precision(cfg)

    lengths = np.array([len(item.input_ids) for item in dataset.items])
    targets = item_targets(dataset)
    cursor = DataCursor(cfg.seed, lengths, cfg.batch_size, state)
    if rank == 0:  # steps logged after the checkpoint we resume from are taken again
        for name in (run_folder.METRICS_FILE, run_folder.NONFINITE_LOG):
            checkpoints.trim_log(os.path.join(run_dir, name), state["step"])
    runlog = RunLog(run_dir, lengths, targets, write=rank == 0)  # counts computed once, here
    progress = Progress(cfg.max_steps, state["step"])
    guard = NonFiniteGuard(cfg, run_dir, rank, world)
    model.train()
    stand_in = None
    while state["step"] < cfg.max_steps:
        lr = lr_at(state["step"], cfg)
        optimizer.set_lr(lr)
        before, rng_before, step_idx = dict(state), checkpoints.snapshot_rng(), []

        # This process's share of the global batch, in grad_accum micro-batches: (batch, weight).
        batches = []
        for _ in range(cfg.grad_accum):
            idx = cursor.take()
            step_idx.extend(int(i) for i in idx)
            runlog.add_batch(idx)
            items = read_items(dataset, idx[rank::world], recipe.data.on_error, skipped)
            if items:
                batches.append((objective.make_batch(items, tokenizer.pad_token_id, recipe.data), 1.0))
        if world > 1 and not batches:
            # Every rank must take part in the gradient all-reduce: a stand-in with no weight.
            stand_in = stand_in or first_readable(dataset)
            batches.append((objective.make_batch([stand_in], tokenizer.pad_token_id, recipe.data), 0.0))

        # Forward and backward. Every token of the global batch weighs the same, however the
        # tokens fall on processes and micro-batches; the parallel wrappers average gradients,
        # hence the factor world.
        # (An align / clip step weighs 1 in the logged interval mean: its loss is batch-level.)
        global_tokens = _global_tokens(batches, targets[step_idx], recipe.data.on_error, world) \
            if objective.token_weighted else 1.0
        token_scale = world / global_tokens if objective.token_weighted else 0.0
        loss_sum, step_figures = 0.0, {}
        for k, (batch, weight) in enumerate(batches):
            # Gradients are averaged across processes once, on the last micro-batch.
            with distributed.no_sync(forward, world > 1 and k < len(batches) - 1), copying_views():
                with precision.autocast():
                    out, logits = forward(**objective.model_inputs(batch))
                term = objective.loss(out, logits, batch, step_figures if weight else None)
                factor = objective.factor(weight, token_scale, len(batches))
                precision.backward(term * factor)
            loss_sum += float(term) * factor
        if guard.skip_step(loss_sum, lambda: [sample_ref(dataset, i) for i in step_idx], before, rng_before,
                           model, optimizer, stepper):
            continue

        # The update, validation, the log line, the checkpoint.
        step = state["step"] + 1
        evaluates = validator is not None and validator.due(step)
        logs = step % cfg.log_every == 0 or step == cfg.max_steps or evaluates
        grad_norm = global_grad_norm(p for ps in groups.values() for p in ps) if logs else 0.0
        precision.step(stepper)
        stepper.clear_grad()
        state["step"] = step
        step_loss = distributed.global_sum([loss_sum], world)[0] / world  # the whole global batch's
        # The interval's mean weighs each step by the labelled tokens of its global batch.
        add_to_interval(state, step_loss, global_tokens, step_figures)
        if logs:
            with copying_views():
                evaluation = validator.evaluate(model, precision) if evaluates else None
            figures = objective.figures(take_interval_sums(state, objective.figure_sums, world))
            record = runlog.write(step, take_interval_mean(state), step_loss, lr, grad_norm,
                                  {**figures, **(evaluation or {})})
            if rank == 0 and not quiet:
                progress.update(record)
            if evaluation and cfg.keep_best:
                _keep_if_best(run_dir, model, state, evaluation["eval_loss"], rank)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            _checkpoint_on_rank0(run_dir, model, distributed.whole_optimizer(optimizer, cfg, world), state,
                                 rank, world, cfg.keep_checkpoints)

    skipped += validator.skipped if validator is not None else []
    skipped_records = distributed.gather_records([str(e) for e in skipped], world)
    runlog.close()
    if rank == 0:
        run_folder.write_skipped(run_dir, skipped_records)
    final = _checkpoint_on_rank0(run_dir, model, distributed.whole_optimizer(optimizer, cfg, world), state,
                                 rank, world, cfg.keep_checkpoints)
    if rank == 0:
        checkpoints.export_weights(run_dir, final)  # model.safetensors is the final checkpoint's
    return run_dir


def _global_tokens(batches: list, step_targets: np.ndarray, on_error: str, world: int) -> float:
    """The labelled-token count of the whole global batch, at least 1 (see training/objectives.py)."""
    if on_error == "skip":  # unreadable items may have been dropped from the batches
        (global_tokens,) = distributed.global_sum([sum(labelled_tokens(b) * w for b, w in batches)], world)
    else:  # every process knows the whole global batch: no all-reduce needed
        global_tokens = float(step_targets.sum())
    return max(global_tokens, 1.0)


def _keep_if_best(run_dir: str, model, state: dict, eval_loss: float, rank: int) -> None:
    """train.keep_best: checkpoint/best/ follows the lowest held-out loss so far (kept in the state,
    so a resumed run compares with the best before its checkpoint, as an uninterrupted one does)."""
    best = state.get("best_eval_loss")
    if best is None or eval_loss < best:
        state["best_eval_loss"] = eval_loss
        if rank == 0:
            checkpoints.save_best(run_dir, model, state["step"], eval_loss)


def _checkpoint_on_rank0(run_dir, model, optimizer, state, rank, world, keep) -> str:
    ckpt = ""
    if rank == 0:
        ckpt = checkpoints.save_checkpoint(run_dir, model, optimizer, dict(state), keep)
    distributed.barrier(world)  # nobody runs ahead of a checkpoint that may be needed to resume
    return ckpt


def _finished_before(run_dir: str, ckpt: str, step: int, max_steps: int, rank: int, world: int) -> str:
    """A rerun of a finished run: complete its weight files if a kill cut the end short, else refuse."""
    exported = checkpoints.is_exported(run_dir, ckpt)
    distributed.barrier(world)  # every rank has looked before rank 0 changes anything
    if exported:
        raise CheckpointError(f"{run_dir}: already trained {step} of max_steps {max_steps} steps")
    if rank == 0:
        checkpoints.export_weights(run_dir, ckpt)
        print(f"{run_dir}: finished from checkpoint {ckpt}", file=sys.stderr)
    return run_dir
