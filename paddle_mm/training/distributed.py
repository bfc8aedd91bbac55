"""Scaling a training run out: process groups, sharding, recompute, mixed precision.

training/loop.py calls these; each reads the `train` section of the recipe. Under
`python -m paddle.distributed.launch` (or `train_in_processes`) every process runs the same
loop on its share of each global batch.
"""
from __future__ import annotations

import contextlib

from paddle_mm.config import TrainConfig
from paddle_mm.errors import RecipeError

# sharding stage -> group_sharded_parallel level (stages 2 and 3; stage 1 goes through fleet)
_GROUP_SHARDED_LEVEL = {2: "os_g", 3: "p_g_os"}


def on_cpu() -> bool:
    import paddle

    return paddle.device.get_device() == "cpu"


def check_settings(recipe) -> None:
    """Reject scaling settings this machine cannot honour, before anything is built."""
    cfg = recipe.train
    if cfg.sharding_stage not in (0, 1, 2, 3):
        raise RecipeError(f"train.sharding_stage must be 0, 1, 2 or 3, got {cfg.sharding_stage}")
    if on_cpu():
        if cfg.sharding_stage in _GROUP_SHARDED_LEVEL:
            # Paddle 3.3.1: "group_sharded_parallel only support gpu, xpu and custom_device now".
            raise RecipeError(f"train.sharding_stage {cfg.sharding_stage} needs a GPU (Paddle's group-sharded "
                              "stages 2 and 3 do not run on CPU); stage 1 shards optimizer states on CPU too")
        if cfg.precision != "fp32":
            # Paddle 3.3.1 on CPU: auto_cast leaves every op in float32, so the setting would do nothing.
            raise RecipeError(f"train.precision {cfg.precision} needs a GPU; on CPU use fp32")
        if recipe.model.lm.attn_implementation == "flashmask":
            raise RecipeError("model.lm.attn_implementation flashmask needs a GPU; on CPU use sdpa")


def join_process_group(cfg: TrainConfig) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by paddle.distributed."""
    import paddle.distributed as dist

    world = dist.get_world_size()
    if world > 1 and not dist.is_initialized():
        if cfg.sharding_stage == 1:
            from paddle.distributed import fleet

            strategy = fleet.DistributedStrategy()
            strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": world}
            fleet.init(is_collective=True, strategy=strategy)
        else:
            dist.init_parallel_env()
    return dist.get_rank(), world


def parallelize(model, optimizer, cfg: TrainConfig, world: int):
    """(the layer to call forward on, the optimizer to step) for this process group.

    Every variant averages gradients over the processes; stage 1 shards the optimizer states
    (each process updates its share of the parameters and broadcasts them), stages 2 and 3
    shard gradients and then parameters as well.
    """
    import paddle

    if world == 1:
        return model, optimizer
    if cfg.sharding_stage == 0:
        return paddle.DataParallel(model), optimizer
    if cfg.sharding_stage == 1:
        from paddle.distributed import fleet

        return fleet.distributed_model(model), fleet.distributed_optimizer(optimizer)
    from paddle.distributed.sharding import group_sharded_parallel

    wrapped, optimizer, _ = group_sharded_parallel(model, optimizer, level=_GROUP_SHARDED_LEVEL[cfg.sharding_stage])
    return wrapped, optimizer


def no_sync(forward, skip: bool):
    """Hold back the gradient all-reduce of this backward (all but the last micro-batch).

    Sharded wrappers reduce gradients in the optimizer step, not in backward, and have no
    no_sync; there is nothing to hold back then.
    """
    if skip and hasattr(forward, "no_sync"):
        return forward.no_sync()
    return contextlib.nullcontext()


def global_sum(values: list[float], world: int) -> list[float]:
    """Element-wise sum of `values` over every process."""
    if world == 1:
        return list(values)
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(t)
    return t.tolist()


class _WholeState:
    """Looks like an optimizer to the checkpoint writer; holds every process's state slots."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def whole_optimizer(optimizer, cfg: TrainConfig, world: int):
    """The optimizer whose state_dict() a checkpoint saves: with sharded states (stage 1) each
    process holds the slots of its own parameters only, so they are gathered (every process
    must call this). A resumed run loads them all; each process keeps the slots it owns.
    """
    if world == 1 or cfg.sharding_stage == 0:
        return optimizer
    import paddle
    import paddle.distributed as dist

    mine = {k: v.numpy() for k, v in optimizer.state_dict().items() if hasattr(v, "numpy")}
    parts: list = []
    dist.all_gather_object(parts, mine)
    return _WholeState({k: paddle.to_tensor(v) for part in parts for k, v in part.items()})


def enable_recompute(model) -> None:
    """Recompute ViT blocks and LM decoder layers in backward instead of keeping activations."""
    from paddle_mm.lm.adapter import enable_recompute as lm_recompute

    model.vision_tower.recompute = True
    lm_recompute(model.language_model)


class Precision:
    """train.precision: autocast around forward; fp16 also scales the loss against underflow."""

    def __init__(self, cfg: TrainConfig):
        import paddle

        self.dtype = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[cfg.precision]
        self.scaler = paddle.amp.GradScaler() if cfg.precision == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        import paddle

        return paddle.amp.auto_cast(dtype=self.dtype, level="O1")

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def any_rank(flag: bool, world: int) -> bool:
    """Whether `flag` is true on any process (so all ranks stop or skip together)."""
    if world == 1:
        return flag
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(float(t) > 0)


def gather_records(records: list[str], world: int) -> list[str]:
    """Every process's records (e.g. the skipped ones: each reads its own share of a batch), without repeats."""
    if world > 1:
        import paddle.distributed as dist

        gathered: list = []
        dist.all_gather_object(gathered, records)
        records = [r for rank_records in gathered for r in rank_records]
    return list(dict.fromkeys(records))


def barrier(world: int) -> None:
    if world > 1:
        import paddle.distributed as dist

        dist.barrier()
