"""Input projectors: map vision features into the language model's embedding space."""
from __future__ import annotations

from paddle_mm.config import ProjectorConfig


def build_projector(cfg: ProjectorConfig, vision_hidden: int, output_hidden: int):
    if cfg.type == "qformer":
        from paddle_mm.projectors.qformer import QFormerProjector

        q = cfg.qformer
        return QFormerProjector(
            vision_hidden,
            output_hidden,
            num_queries=q.num_queries,
            hidden_size=q.hidden_size,
            num_layers=q.num_layers,
            num_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            cross_attention_every=q.cross_attention_every,
            layer_norm_eps=q.layer_norm_eps,
            cross_attention_locality=q.cross_attention_locality,
        )
    from paddle_mm.projectors.mlp import MLPProjector

    return MLPProjector(vision_hidden, output_hidden, depth=cfg.mlp_depth, pool=cfg.pool)
