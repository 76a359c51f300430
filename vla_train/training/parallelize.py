"""FSDP2 for a PrismaticVLM: activation checkpointing, then `fully_shard` per unit, in one function.

Units are composed from what each part declares, in forward order: the vision backbone's `fsdp_units()` (every ViT
block, then each whole featurizer), the projector, the LLM backbone's `fsdp_units()` (every decoder layer), the
policy's `policy_fsdp_units()` (VLA-Adapter's Bridge blocks), then the root (LLM embeddings, final norm, head).
Activation checkpointing wraps the items of each backbone's `activation_checkpoint_containers()` and of the policy's
`policy_checkpoint_containers()` in place, so state-dict keys are unchanged. A new backbone or policy family plugs in
by declaring those methods; nothing here names a family's modules.

Strategies are `config/vla.py`'s `TRAIN_STRATEGIES` (the one list); `resolve_train_strategy` maps the reference's
ids by node count (`fsdp-full-shard` -> `hybrid-shard` on several nodes, `full-shard` on one; `fsdp-shard-grad-op`
-> `hybrid-shard-grad-op` / `shard-grad-op`), as the reference ran hybrid sharding under those names.
- `full-shard` (ZeRO-3) and `shard-grad-op` (parameters stay gathered between forward and backward, ZeRO-2-like):
  a 1-D mesh over all ranks;
- `hybrid-shard` / `hybrid-shard-grad-op`: the same within a node, replicated across nodes, on a 2-D
  `(replicate, shard)` mesh of shape `(num_nodes, local_world_size)`.
As in torchtitan, the root and the last unit (decoder layer or policy block) are never re-sharded after forward:
backward needs their parameters first. The log line names the requested and the resolved strategy and the mesh shape.
Mixed precision: FP32 master weights, bf16 compute, fp32 (or bf16) gradient reduction. A frozen vision backbone is
cast to bf16 first, as the reference does, outside the stages that train it (unless the policy trains parameters
inside it: OFT's FiLM projections). With LoRA, every frozen base weight is bf16 and only the adapters and the
policy's heads keep FP32 master weights.
"""

import dataclasses
import warnings

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vla_train.config.vla import HYBRID_STRATEGIES, RESHARDING_STRATEGIES, resolve_train_strategy
from vla_train.log import logger
from vla_train.models.vlm import PrismaticVLM
from vla_train.training.distributed import DistributedContext

STAGES_TRAINING_VISION = ("vla-full-train", "full-finetune", "vla-sandwich-train")


def build_mesh(ctx: DistributedContext, strategy: str) -> DeviceMesh:
    """A 2-D `(replicate, shard)` mesh of shape `(num_nodes, local_world_size)` for a hybrid strategy (resolved
    name), else a 1-D `(shard,)` mesh over all ranks. Collective."""
    if strategy in HYBRID_STRATEGIES:
        if ctx.world_size % ctx.local_world_size:
            raise ValueError(f"{strategy} needs the same number of processes on every node: world size "
                             f"{ctx.world_size} is not a multiple of {ctx.local_world_size} per node. Fix: launch "
                             "equal --nproc-per-node on every node, or use --vla.train_strategy full-shard.")
        return init_device_mesh(ctx.device.type, (ctx.num_nodes, ctx.local_world_size),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("shard",))


def _checkpoint_items(container: nn.Module) -> None:
    """Replace each item with a non-reentrant activation-checkpointing wrapper (state-dict keys unchanged)."""
    for index, block in enumerate(container):
        container[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                              preserve_rng_state=False)


def _fully_shard_units(vlm: PrismaticVLM, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reshard: bool) -> None:
    """`fully_shard` every declared unit, inner first, then the root; the root and the last unit keep
    their parameters gathered after forward (torchtitan's choice: backward starts with them)."""
    llm_units = vlm.llm_backbone.fsdp_units()
    if not llm_units:
        raise ValueError(f"LLM backbone {vlm.llm_backbone.identifier!r} declares no FSDP units (fsdp_units()).")
    last = ([*llm_units, *vlm.policy_fsdp_units()])[-1]
    for unit in (*vlm.vision_backbone.fsdp_units(), vlm.projector, *llm_units, *vlm.policy_fsdp_units()):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard and unit is not last)
    root_policy = dataclasses.replace(policy, cast_forward_inputs=vlm.root_casts_forward_inputs)
    fully_shard(vlm, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)


# torch 2.14 warns whenever an FSDP2 unit returns a view (a featurizer's patch tokens are a slice of its output, a
# Linear on [B, P, D] returns a reshaped view): an in-place op on it would skip the pre-backward hook. Our consumers are
# out of place (`torch.cat`, `Linear`, `.to`), which tests/training/test_accumulation.py checks through the gradients.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(VisionTransformer|\w*Projector|\w*VLM)\) "
                        r"returned a view tensor")


def cast_frozen_to_bf16(model: nn.Module) -> None:
    """Every frozen parameter to bf16 in place (LoRA: the base weights; the adapters and heads stay FP32 masters).
    A tied parameter is cast once and stays tied."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad or param.dtype == torch.bfloat16:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)
            setattr(module, name, cast[id(param)])


def parallelize_vlm(vlm: PrismaticVLM, ctx: DistributedContext, *, strategy: str, stage: str,
                    mixed_precision: bool = True, reduce_in_full_precision: bool = True,
                    activation_checkpointing: bool = True, checkpoint_vision_blocks: bool = False) -> PrismaticVLM:
    """Apply activation checkpointing and FSDP2 in place (collective: call on every rank); returns the model.

    A model with real weights moves to `ctx.device` first; a model built on the meta device is sharded there, and
    `training.loading.load_weights` then materializes and fills each rank's shards.

    `strategy` is a `TRAIN_STRATEGIES` name or a reference id, resolved for `ctx.num_nodes` nodes.
    """
    resolved = resolve_train_strategy(strategy, ctx.num_nodes)
    if not any(param.is_meta for param in vlm.parameters()):  # a meta-device model stays there: each rank
        vlm.to(ctx.device)  # allocates and fills only its shards afterwards (training/loading.py)
    vision_params = {id(param) for param in vlm.vision_backbone.parameters()}
    policy_trains_vision = any(id(param) in vision_params for param in vlm.always_trainable())  # FiLM
    if mixed_precision and vlm.lora is not None:
        cast_frozen_to_bf16(vlm)
    elif mixed_precision and stage not in STAGES_TRAINING_VISION and not policy_trains_vision:
        vlm.vision_backbone.to(torch.bfloat16)
    if activation_checkpointing:
        containers = [*vlm.llm_backbone.activation_checkpoint_containers(), *vlm.policy_checkpoint_containers()]
        if checkpoint_vision_blocks:
            containers = [*containers, *vlm.vision_backbone.activation_checkpoint_containers()]
        for container in containers:
            _checkpoint_items(container)
    mesh = build_mesh(ctx, resolved)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if reduce_in_full_precision else torch.bfloat16) \
        if mixed_precision else MixedPrecisionPolicy()
    _fully_shard_units(vlm, mesh, policy, reshard=resolved in RESHARDING_STRATEGIES)
    logger.info("FSDP2 train_strategy %s ran as %s on mesh %s %s, parameter placements %s (%d node(s); mixed "
                "precision %s, reduce %s, activation checkpointing %s)", strategy, resolved, tuple(mesh.shape),
                mesh.mesh_dim_names, next(vlm.parameters()).placements, ctx.num_nodes, mixed_precision,
                "fp32" if reduce_in_full_precision else "bf16", activation_checkpointing)
    return vlm
