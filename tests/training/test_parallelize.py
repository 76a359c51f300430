"""parallelize_vlm on a 1-process gloo group: units composed from the backbones' declarations, activation
checkpointing, meshes and placements per strategy, which units stay gathered after forward, state-dict keys."""


import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from tests.conftest import build_tiny
from vla_train.training.distributed import DistributedContext
from vla_train.training.parallelize import build_mesh, parallelize_vlm

MODEL_ID = "tiny-dinosiglip+tiny-llama"
CPU_CONTEXT = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                                 backend="gloo")




def _batch(vlm) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vlm.llm_backbone.llm.config.vocab_size, (2, 8), generator=generator)
    input_ids[:, 0] = 1
    size = vlm.vision_backbone.default_image_resolution
    pixels = {key: torch.randn(2, *size, generator=generator) for key in vlm.vision_backbone.keys}
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                labels=input_ids.clone())


def _is_sharded(module: torch.nn.Module) -> bool:
    """True when the unit's parameters are the sharded DTensors (FSDP2 swaps in plain tensors while gathered)."""
    return all(isinstance(p, DTensor) for p in module.parameters())


@pytest.mark.parametrize(("strategy", "resolved", "mesh_shape", "placements", "reshards"), [
    ("full-shard", "full-shard", (1,), (Shard(0),), True),
    ("fsdp-full-shard", "full-shard", (1,), (Shard(0),), True),  # one node: the reference id is full sharding
    ("shard-grad-op", "shard-grad-op", (1,), (Shard(0),), False),
    ("fsdp-shard-grad-op", "shard-grad-op", (1,), (Shard(0),), False),
    ("hybrid-shard", "hybrid-shard", (1, 1), (Replicate(), Shard(0)), True),
    ("hybrid-shard-grad-op", "hybrid-shard-grad-op", (1, 1), (Replicate(), Shard(0)), False),
])
def test_units_placements_and_resharding(strategy, resolved, mesh_shape, placements, reshards, process_group,
                                         log_records):
    vlm = build_tiny(MODEL_ID)
    keys = list(vlm.state_dict())
    parallelize_vlm(vlm, CPU_CONTEXT, strategy=strategy, stage="vla-full-train")
    assert list(vlm.state_dict()) == keys  # checkpoints stay compatible
    message = f"train_strategy {strategy} ran as {resolved} on mesh {mesh_shape}"
    assert any(message in r.getMessage() and str(placements) in r.getMessage() for r in log_records.records)

    featurizers = vlm.vision_backbone.featurizers
    blocks = [block for featurizer in featurizers for block in featurizer.blocks]
    layers = list(vlm.llm_backbone.llm.model.layers)
    assert all(isinstance(layer, CheckpointWrapper) for layer in layers)
    assert not any(isinstance(block, CheckpointWrapper) for block in blocks)  # checkpoint_vision_blocks=False
    tails = [m for m in vlm.vision_backbone.unused_modules() if m not in blocks]  # never-called units of their own
    units = [*blocks, *tails, *featurizers, vlm.projector, *layers, vlm]
    assert all(isinstance(unit, FSDPModule) for unit in units)
    assert sum(isinstance(m, FSDPModule) for m in vlm.modules()) == len(units)  # no other units
    for param in vlm.parameters():
        assert isinstance(param, DTensor) and param.placements == placements
        assert param.device_mesh.shape == mesh_shape

    loss = vlm(**_batch(vlm)).loss  # after forward, before backward: who was re-sharded?
    head = vlm.llm_backbone.llm.lm_head  # a module of the root unit
    assert not _is_sharded(layers[-1]) and not _is_sharded(head)  # last decoder layer and root stay gathered
    assert _is_sharded(layers[0]) is reshards
    assert _is_sharded(vlm.projector) is reshards
    assert _is_sharded(blocks[0]) is reshards
    loss.backward()
    assert _is_sharded(layers[-1]) and _is_sharded(head) and _is_sharded(layers[0])
    assert all(p.grad is not None for p in layers[0].parameters())


def test_checkpointing_follows_the_declared_containers_and_frozen_vision_is_bf16(process_group):
    vlm = build_tiny(MODEL_ID)
    parallelize_vlm(vlm, CPU_CONTEXT, strategy="full-shard", stage="vla-train", checkpoint_vision_blocks=True,
                    activation_checkpointing=True)
    for featurizer in vlm.vision_backbone.featurizers:
        assert all(isinstance(block, CheckpointWrapper) for block in featurizer.blocks)
    assert {p.dtype for p in vlm.vision_backbone.parameters()} == {torch.bfloat16}  # frozen stage: cast first
    assert {p.dtype for p in vlm.llm_backbone.parameters()} == {torch.float32}  # FP32 master weights

    plain = build_tiny(MODEL_ID)
    parallelize_vlm(plain, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train", activation_checkpointing=False,
                    mixed_precision=False)
    assert not any(isinstance(m, CheckpointWrapper) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def test_parallelize_composes_what_the_backbones_declare(process_group, monkeypatch):
    """A backbone that declares each featurizer as one unit (torchtitan's choice for a small encoder) gets exactly
    that: no per-block units, with nothing changed in parallelize."""
    vlm = build_tiny(MODEL_ID)
    featurizers = vlm.vision_backbone.featurizers
    monkeypatch.setattr(vlm.vision_backbone, "fsdp_units", lambda: list(featurizers))
    monkeypatch.setattr(vlm.llm_backbone, "activation_checkpoint_containers", lambda: [])
    parallelize_vlm(vlm, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train")
    assert all(isinstance(f, FSDPModule) for f in featurizers)
    assert not any(isinstance(block, FSDPModule) for f in featurizers for block in f.blocks)
    assert not any(isinstance(m, CheckpointWrapper) for m in vlm.modules())


def test_backbones_declare_units_in_forward_order():
    vlm = build_tiny(MODEL_ID)
    vision, llm = vlm.vision_backbone, vlm.llm_backbone
    dino, siglip = vision.featurizers
    assert vision.fsdp_units() == [*dino.blocks, dino.norm, dino, *siglip.blocks, siglip.norm, siglip.attn_pool, siglip]
    assert vision.activation_checkpoint_containers() == [dino.blocks, siglip.blocks]
    assert llm.fsdp_units() == list(llm.llm.model.layers) and len(llm.fsdp_units()) == 2
    assert llm.activation_checkpoint_containers() == [llm.llm.model.layers]
    assert llm.last_layer_finetune_modules[1] is llm.llm.model.layers[-1]


def test_hybrid_mesh_needs_equal_processes_per_node():
    uneven = DistributedContext(rank=0, world_size=3, local_rank=0, local_world_size=2, device=torch.device("cpu"),
                                backend="gloo")
    with pytest.raises(ValueError, match=r"hybrid-shard needs the same number of processes on every node: world "
                                         r"size 3 is not a multiple of 2 per node\. Fix:"):
        build_mesh(uneven, "hybrid-shard")


def _adapter_batch(model) -> dict:
    from vla_train.models.vla_prompt import vla_training_ids

    tokenizer = model.llm_backbone.get_tokenizer()
    ids, labels = vla_training_ids(model.llm_backbone.prompt_builder_fn, tokenizer, "pick up the cup",
                                   [model.placeholder_id] * model.num_action_queries, append_stop=False)
    generator = torch.Generator().manual_seed(1)
    size = model.vision_backbone.default_image_resolution
    pixels = [{key: torch.randn(2, *size, generator=generator) for key in model.vision_backbone.keys}
              for _ in range(2)]
    return dict(input_ids=torch.tensor([ids, ids]), attention_mask=torch.ones(2, len(ids), dtype=torch.bool),
                pixel_values=pixels, labels=torch.tensor([labels, labels]),
                actions=torch.randn(2, 3, 7, generator=generator), action_mask=torch.ones(2, 3, dtype=torch.bool),
                proprio=torch.randn(2, 4, generator=generator))


def test_vla_adapters_bridge_blocks_are_checkpointed_units_with_the_plain_models_gradients(process_group):
    """The policy declares its Bridge blocks: each is activation-checkpointed and its own FSDP2 unit after the
    decoder layers; the last block (not the last decoder layer) stays gathered for backward; the loss and every
    gradient equal the unwrapped model's."""
    from vla_train.config.policy import VLAAdapterPolicyConfig

    config = VLAAdapterPolicyConfig(chunk_length=3, action_dim=7, proprio_dim=4, num_action_queries=5)
    plain = config.build_model(build_tiny("tiny-dinosiglip+tiny-qwen25", vla=True))
    model = config.build_model(build_tiny("tiny-dinosiglip+tiny-qwen25", vla=True))
    model.load_state_dict(plain.state_dict())
    parallelize_vlm(model, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train", mixed_precision=False)
    blocks = list(model.action_head.model.mlp_resnet_blocks)
    layers = list(model.llm_backbone.llm.model.layers)
    assert all(isinstance(b, CheckpointWrapper) and isinstance(b, FSDPModule) for b in blocks)
    assert list(model.state_dict()) == list(plain.state_dict())
    batch = _adapter_batch(plain)
    expected = plain(**batch, generator=torch.Generator().manual_seed(0))
    expected.loss.backward()
    got = model(**batch, generator=torch.Generator().manual_seed(0))
    assert not _is_sharded(blocks[-1]) and _is_sharded(blocks[0]) and _is_sharded(layers[-1])
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss)
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor() for name, p in
             model.named_parameters() if p.grad is not None}
    reference = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys() and "action_queries.weight" in grads
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_vla_adapters_bridge_blocks_compute_in_bf16_and_reduce_in_fp32(process_group):
    """Under mixed precision each Bridge unit runs in bf16 (its output dtype), its FP32 master gradients come back
    FP32, and the loss stays within bf16 error of the FP32 model's."""
    from vla_train.config.policy import VLAAdapterPolicyConfig

    config = VLAAdapterPolicyConfig(chunk_length=3, action_dim=7, proprio_dim=4, num_action_queries=5)
    plain = config.build_model(build_tiny("tiny-dinosiglip+tiny-qwen25", vla=True))
    model = config.build_model(build_tiny("tiny-dinosiglip+tiny-qwen25", vla=True))
    model.load_state_dict(plain.state_dict())
    parallelize_vlm(model, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train", mixed_precision=True)
    dtypes = []
    handle = model.action_head.model.mlp_resnet_blocks[0].register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype))
    batch = _adapter_batch(plain)
    got = model(**batch, generator=torch.Generator().manual_seed(0))
    handle.remove()
    got.loss.backward()
    expected = plain(**batch, generator=torch.Generator().manual_seed(0)).loss
    assert dtypes == [torch.bfloat16]
    torch.testing.assert_close(got.loss.float(), expected, rtol=5e-2, atol=5e-3)
    grad = model.action_head.model.mlp_resnet_blocks[0].q_proj.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad.full_tensor()).all()
