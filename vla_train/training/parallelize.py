"""FSDP2 for a PrismaticVLM: activation checkpointing, then `fully_shard` per unit, in one function.

Units (composed from what each backbone declares): every LLM decoder layer, every ViT block and then each whole
featurizer, the projector, then the root (embeddings, final norm, head). Strategies, named for what they do:
- `full-shard`: ZeRO-3, parameters re-sharded after forward (the reference's `fsdp-full-shard` id maps here; the
  reference actually ran hybrid sharding under that name);
- `shard-grad-op`: parameters stay gathered between forward and backward (ZeRO-2-like; alias `fsdp-shard-grad-op`);
- `hybrid-shard`: shard within a node, replicate across nodes (a 2-D device mesh).
Mixed precision: FP32 master weights, bf16 compute, fp32 (or bf16) gradient reduction. A frozen vision backbone is
cast to bf16 first, as the reference does, outside the stages that train it.
"""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vla_train.log import logger
from vla_train.models.vlm import PrismaticVLM
from vla_train.training.distributed import DistributedContext

STRATEGIES = ("full-shard", "shard-grad-op", "hybrid-shard")
STRATEGY_ALIASES = {"fsdp-full-shard": "full-shard", "fsdp-shard-grad-op": "shard-grad-op"}
STAGES_TRAINING_VISION = ("vla-full-train", "full-finetune", "vla-sandwich-train")


def normalize_strategy(strategy: str) -> str:
    strategy = STRATEGY_ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown train_strategy {strategy!r}; choose one of {list(STRATEGIES)} "
                         f"(aliases: {STRATEGY_ALIASES}).")
    return strategy


def build_mesh(ctx: DistributedContext, strategy: str) -> DeviceMesh:
    device_type = ctx.device.type
    if strategy == "hybrid-shard":
        if ctx.world_size % ctx.local_world_size:
            raise ValueError(f"hybrid-shard needs equal GPUs per node: world {ctx.world_size}, "
                             f"local {ctx.local_world_size}.")
        return init_device_mesh(device_type, (ctx.num_nodes, ctx.local_world_size),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (ctx.world_size,), mesh_dim_names=("shard",))


def _checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Replace each block with a non-reentrant activation-checkpointing wrapper (state-dict keys unchanged)."""
    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)


def parallelize_vlm(vlm: PrismaticVLM, ctx: DistributedContext, *, strategy: str, stage: str,
                    mixed_precision: bool = True, reduce_in_full_precision: bool = True,
                    activation_checkpointing: bool = True, checkpoint_vision_blocks: bool = False) -> PrismaticVLM:
    """Apply activation checkpointing and FSDP2 in place (collective: call on every rank); returns the model."""
    strategy = normalize_strategy(strategy)
    vlm.to(ctx.device)
    if mixed_precision and stage not in STAGES_TRAINING_VISION:
        vlm.vision_backbone.to(torch.bfloat16)
    llm_layers = vlm.llm_backbone.llm.model.layers
    if activation_checkpointing:
        _checkpoint_blocks(llm_layers)
        if checkpoint_vision_blocks:
            for featurizer in vlm.vision_backbone.featurizers:
                _checkpoint_blocks(featurizer.blocks)
    mesh = build_mesh(ctx, strategy)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if reduce_in_full_precision else torch.bfloat16) \
        if mixed_precision else MixedPrecisionPolicy()
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=strategy != "shard-grad-op")
    for featurizer in vlm.vision_backbone.featurizers:
        for block in featurizer.blocks:
            fully_shard(block, **kwargs)
        fully_shard(featurizer, **kwargs)
    for layer in llm_layers:
        fully_shard(layer, **kwargs)
    fully_shard(vlm.projector, **kwargs)
    fully_shard(vlm, **kwargs)
    logger.info("FSDP2 %s over %s (mixed precision %s, reduce %s, activation checkpointing %s)", strategy,
                tuple(mesh.shape), mixed_precision, "fp32" if reduce_in_full_precision else "bf16",
                activation_checkpointing)
    return vlm
