"""Compute the training step does not need (issue #10): the ViT's never-used tail and the dense LM-head logits.

1. Featurizers stop after block `depth - 2` (bit-identical to timm's `get_intermediate_layers`), the modules they never
   call are frozen in every stage and never all-gathered by FSDP2, and their state-dict keys stay.
2. In training, logits are computed at supervised positions only; loss, gradients and metrics equal the full-logits
   path (eval mode), also under FSDP2 with activation checkpointing.
"""

import copy

import pytest
import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor

from tests.conftest import build_tiny
from vla_train.models.freezing import STAGES, freeze_backbones
from vla_train.models.llm import IGNORE_INDEX, SupervisedCausalLMOutput
from vla_train.models.vision import FeaturizerSpec, VisionBackbone, build_featurizer
from vla_train.training.distributed import DistributedContext
from vla_train.training.metrics import ActionMetrics
from vla_train.training.parallelize import parallelize_vlm

MODEL_ID = "tiny-dinosiglip+tiny-llama"
CPU_CONTEXT = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                                 backend="gloo")
_TINY = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
# (timm id, overrides): DINOv2 with registers, SigLIP (attention pool), CLIP (pre-norm) at a tiny size.
FEATURIZERS = [("vit_large_patch14_reg4_dinov2", _TINY), ("vit_so400m_patch14_siglip_224", _TINY),
               ("vit_base_patch16_clip_224", {**_TINY, "act_layer": "quick_gelu"})]


# ------------------------------------------------------------------------------------------------ 1. the ViT tail
@pytest.mark.parametrize(("timm_id", "overrides"), FEATURIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_featurizer_output_is_bit_identical_and_the_last_block_never_runs(timm_id, overrides, dtype):
    featurizer = build_featurizer(FeaturizerSpec(timm_id, overrides), 64).to(dtype)
    calls = [0] * len(featurizer.blocks)
    for index, block in enumerate(featurizer.blocks):
        block.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        features = featurizer(pixels)
        assert calls == [1, 1, 1, 0]  # block depth - 1 is skipped
        (reference,) = featurizer.get_intermediate_layers(pixels, n=[len(featurizer.blocks) - 2])
    assert calls == [2, 2, 2, 1]  # the old call ran every block
    assert features.shape == (2, 64, 32) and features.dtype == dtype
    assert torch.equal(features, reference)


@pytest.mark.parametrize("backbone_id", ["tiny-dinosiglip-vit", "tiny-siglip-vit"])
def test_unused_modules_are_exactly_the_parameters_without_gradient(backbone_id):
    backbone = VisionBackbone(backbone_id, "resize-naive")
    unused = {id(p) for m in backbone.unused_modules() for p in m.parameters()}
    assert all(not p.requires_grad for m in backbone.unused_modules() for p in m.parameters())
    for param in backbone.parameters():  # make everything trainable to see what the forward reaches
        param.requires_grad_(True)
    size = backbone.spec.image_size
    pixels = {key: torch.randn(2, 3, size, size) for key in backbone.keys} if backbone.is_fused \
        else torch.randn(2, 3, size, size)
    backbone(pixels).square().sum().backward()
    unreached = {id(p) for p in backbone.parameters() if p.grad is None}
    assert unreached == unused
    names = [n for n, p in backbone.named_parameters() if id(p) in unused]
    # per featurizer: its last block (dino: 14 tensors incl. layer scale, siglip: 12), final norm (2), SigLIP's
    # attention pool (13)
    assert len(names) == {"tiny-dinosiglip-vit": 14 + 2 + 12 + 2 + 13, "tiny-siglip-vit": 12 + 2 + 13}[backbone_id]
    assert set(names) <= set(backbone.state_dict())  # checkpoints keep the full ViT
    backbone.requires_grad_(True)
    assert {id(p) for p in backbone.parameters() if not p.requires_grad} == unused


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_keeps_the_unused_tail_frozen(stage):
    vlm = build_tiny(MODEL_ID)
    freeze_backbones(vlm, stage)
    vision = vlm.vision_backbone
    unused = {id(p) for m in vision.unused_modules() for p in m.parameters()}
    trainable_vision = {id(p) for p in vision.parameters() if p.requires_grad}
    assert not unused & trainable_vision
    used = {id(p) for p in vision.parameters()} - unused
    assert trainable_vision == (used if STAGES[stage].vision else set())


def _batch(vlm, batch_size: int = 3, text_len: int = 10, seed: int = 0) -> dict:
    """Right-padded rows with 2, 4 and 5 supervised tokens (labels -100 over prompt and padding)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = vlm.llm_backbone.llm.config.vocab_size
    input_ids = torch.randint(3, vocab, (batch_size, text_len), generator=generator)
    input_ids[:, 0] = 1
    lengths = [6, text_len, 8][:batch_size]
    supervised = [2, 4, 5][:batch_size]
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (length, count) in enumerate(zip(lengths, supervised, strict=True)):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = 0  # pad id
        labels[row, length - count:length] = input_ids[row, length - count:length]
    size = vlm.vision_backbone.spec.image_size
    pixels = {key: torch.randn(batch_size, 3, size, size, generator=generator) for key in vlm.vision_backbone.keys}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels, "labels": labels}


def _record_unshards(monkeypatch) -> list[tuple[torch.nn.Module, ...]]:
    """Every FSDP2 unit unshard (all-gather of a unit's parameters), as the unit's modules."""
    unshards: list[tuple[torch.nn.Module, ...]] = []
    original = _fsdp_param_group.FSDPParamGroup.unshard

    def unshard(self, *args, **kwargs):
        unshards.append(self.modules)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_fsdp_param_group.FSDPParamGroup, "unshard", unshard)
    return unshards


@pytest.mark.parametrize("strategy", ["full-shard", "shard-grad-op"])
def test_fsdp_never_gathers_the_unused_tail(strategy, process_group, monkeypatch):
    vlm = build_tiny(MODEL_ID)
    keys = list(vlm.state_dict())
    freeze_backbones(vlm, "vla-full-train")
    parallelize_vlm(vlm, CPU_CONTEXT, strategy=strategy, stage="vla-full-train", checkpoint_vision_blocks=True)
    assert list(vlm.state_dict()) == keys
    vision = vlm.vision_backbone
    unused = vision.unused_modules()
    assert len(unused) == 5  # dino: last block, norm; siglip: last block, norm, attention pool
    units = vision.fsdp_units()
    assert all(module in units for module in unused)
    unshards = _record_unshards(monkeypatch)
    for seed in range(2):  # two micro-batches
        vlm(**_batch(vlm, seed=seed)).loss.backward()
        assert all(isinstance(p, DTensor) for m in unused for p in m.parameters())  # still sharded
    gathered = [module for group in unshards for module in group]
    assert not any(module is u for u in unused for module in gathered)
    used_units = [unit for unit in units if not any(unit is u for u in unused)]
    assert all(any(unit is module for module in gathered) for unit in [*used_units, vlm.projector, vlm])
    assert all(p.grad is None for m in unused for p in m.parameters())
    assert all(p.grad is not None for f in vision.featurizers for p in f.blocks[-2].parameters())


def test_unused_tail_units_are_declared_before_their_featurizer():
    vision = build_tiny(MODEL_ID).vision_backbone
    dino, siglip = vision.featurizers
    assert vision.fsdp_units() == [*dino.blocks, dino.norm, dino, *siglip.blocks, siglip.norm, siglip.attn_pool,
                                   siglip]
    assert vision.unused_modules() == [dino.blocks[-1], dino.norm, siglip.blocks[-1], siglip.norm, siglip.attn_pool]


# ----------------------------------------------------------------------------------- 2. logits at supervised positions
def _dense_and_sparse(vlm, batch: dict, **kwargs) -> tuple:
    """(dense output, dense grads, sparse output, sparse grads): eval mode (full logits) vs train mode."""
    results = []
    for training in (False, True):
        vlm.train(training)
        vlm.zero_grad(set_to_none=True)
        output = vlm(**batch, **kwargs)
        output.loss.backward()
        results += [output, {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}]
    vlm.train()
    return tuple(results)


@pytest.mark.parametrize("model_id", ["tiny-dinosiglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25"])
@pytest.mark.parametrize("num_items_in_batch", [None, 7.5])
def test_sparse_loss_and_gradients_equal_the_full_logits(model_id, num_items_in_batch):
    vlm = build_tiny(model_id)
    batch = _batch(vlm)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    dense, dense_grads, sparse, sparse_grads = _dense_and_sparse(vlm, batch, **kwargs)
    vocab = vlm.llm_backbone.llm.config.vocab_size
    assert not isinstance(dense, SupervisedCausalLMOutput)
    assert dense.logits.shape == (3, 10 + vlm.num_patches, vocab)
    assert isinstance(sparse, SupervisedCausalLMOutput) and sparse.logits.shape == (2 + 4 + 5, vocab)
    assert sparse.rows.tolist() == [0] * 2 + [1] * 4 + [2] * 5
    for row in range(3):
        labels = batch["labels"][row, 1:]
        assert sparse.labels[sparse.rows == row].tolist() == labels[labels != IGNORE_INDEX].tolist()
    # the sparse logits are the full logits at (row, position)
    torch.testing.assert_close(sparse.logits, dense.logits[sparse.rows, sparse.positions], rtol=1e-6, atol=1e-6)
    assert torch.equal(sparse.loss, dense.loss)  # bit-identical; gradients differ by summation order only
    if num_items_in_batch is not None:  # sum / num_items_in_batch, as Hugging Face's ForCausalLMLoss
        expected = torch.nn.functional.cross_entropy(sparse.logits.float(), sparse.labels, reduction="sum") / 7.5
        torch.testing.assert_close(sparse.loss, expected, rtol=1e-6, atol=0)
    assert set(sparse_grads) == set(dense_grads)
    assert len(dense_grads) == sum(p.requires_grad for p in vlm.parameters())
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sparse_path_under_bf16_autocast_matches_the_full_logits():
    vlm = build_tiny(MODEL_ID)
    batch = _batch(vlm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, dense_grads, sparse, sparse_grads = _dense_and_sparse(vlm, batch, num_items_in_batch=11)
    assert sparse.logits.dtype == torch.bfloat16 and sparse.loss.dtype == torch.float32  # loss upcast, as HF
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-3, atol=0)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=2e-2, atol=1e-4, msg=name)


def test_metrics_from_the_sparse_output_equal_the_full_logits_metrics():
    vlm = build_tiny(MODEL_ID, vla=True)
    batch = _batch(vlm)
    tokenizer = vlm.action_tokenizer
    action_ids = torch.randint(tokenizer.action_token_begin_idx + 1, tokenizer.vocab_end, batch["labels"].shape)
    batch["labels"] = torch.where(batch["labels"] != IGNORE_INDEX, action_ids, IGNORE_INDEX)  # action tokens
    names = [b"bridge", b"fractal", b"bridge"]
    meters = [ActionMetrics(tokenizer, ["bridge", "fractal"], vlm.num_patches) for _ in range(2)]
    with torch.no_grad():
        dense = vlm.eval()(**batch)
        sparse = vlm.train()(**batch)
    meters[0].accumulate(dense.logits, batch["labels"], names)
    meters[1].accumulate_output(sparse, batch["labels"], names)
    expected, got = meters[0].reduce(), meters[1].reduce()
    assert set(got) == set(expected) and len(got) == 9
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_rows_follow_the_input_order_with_text_only_rows():
    vlm = build_tiny(MODEL_ID)
    batch = _batch(vlm)
    output = vlm(**batch, multimodal_indices=torch.tensor([2, 0]))  # row 1 is text only: fused last
    for row in range(3):
        labels = batch["labels"][row, 1:]
        assert output.labels[output.rows == row].tolist() == labels[labels != IGNORE_INDEX].tolist()
    with torch.no_grad():
        dense = vlm.eval()(**batch, multimodal_indices=torch.tensor([2, 0]))
    torch.testing.assert_close(output.loss, dense.loss, rtol=1e-6, atol=0)


def test_inference_keeps_full_logits():
    vlm = build_tiny(MODEL_ID)
    batch = _batch(vlm)
    full = (3, 10 + vlm.num_patches, vlm.llm_backbone.llm.config.vocab_size)
    with torch.no_grad():
        assert vlm.eval()(**batch).logits.shape == full  # eval with labels
        unlabelled = {k: v for k, v in batch.items() if k != "labels"}
        assert vlm.train()(**unlabelled).logits.shape == full  # train mode without labels


def test_sparse_path_under_fsdp2_and_activation_checkpointing(process_group):
    vlm = build_tiny(MODEL_ID)
    freeze_backbones(vlm, "vla-full-train")
    reference = copy.deepcopy(vlm)
    batch = _batch(vlm)
    dense, dense_grads, _, _ = _dense_and_sparse(reference, batch, num_items_in_batch=11)
    parallelize_vlm(vlm, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train", mixed_precision=False,
                    activation_checkpointing=True, checkpoint_vision_blocks=True)
    output = vlm(**batch, num_items_in_batch=11)
    assert isinstance(output, SupervisedCausalLMOutput) and output.logits.shape[0] == 11
    output.loss.backward()
    torch.testing.assert_close(output.loss, dense.loss, rtol=1e-6, atol=0)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor()
             for n, p in vlm.named_parameters() if p.grad is not None}
    assert set(grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)



# ------------------------------------------------------------------------- checkpoint: every optimizer state is saved
def _trained_vla_full_train(old_behaviour: bool = False) -> tuple:
    """The tiny VLM under FSDP2 in a stage that trains vision, with AdamW after two steps. `old_behaviour` makes the
    unused tail trainable again (as before: in the optimizer, never given a gradient)."""
    vlm = build_tiny(MODEL_ID)
    freeze_backbones(vlm, "vla-full-train")
    if old_behaviour:
        for param in (p for m in vlm.vision_backbone.unused_modules() for p in m.parameters()):
            param.requires_grad_(True)
    parallelize_vlm(vlm, CPU_CONTEXT, strategy="full-shard", stage="vla-full-train")
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for seed in range(2):
        vlm(**_batch(vlm, seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return vlm, optimizer, scheduler


def _load_optimizer_strictly(model, optimizer, path) -> None:
    """DCP-load the optimizer state of EVERY parameter of `optimizer` from `path` (the default planner raises on a
    key the checkpoint lacks), then set it with `strict=True`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from vla_train.training.checkpoint_state import OPTIMIZER

    template = get_optimizer_state_dict(model, optimizer)  # a state for every parameter
    dcp.load({OPTIMIZER: template}, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, template, options=StateDictOptions(strict=True))


def _optimizer_tensors(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)["state"]
    return {(fqn, key): (v.full_tensor() if isinstance(v, DTensor) else v).clone()
            for fqn, values in state.items() for key, v in values.items()}


def test_checkpoint_holds_every_optimizer_state_and_loads_strictly(tmp_path, process_group):
    from vla_train.training.checkpoint import CheckpointManager
    from vla_train.training.checkpoint_state import training_states

    vlm, optimizer, scheduler = _trained_vla_full_train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(optimizer.state) == len(params) == sum(p.requires_grad for p in vlm.parameters())  # all stepped
    expected = _optimizer_tensors(vlm, optimizer)
    manager = CheckpointManager(tmp_path)
    path = manager.save(2, 0, 1.0, *training_states(vlm, optimizer, scheduler, None))

    fresh, fresh_optimizer, fresh_scheduler = _trained_vla_full_train()  # different state: two other steps
    fresh_optimizer.state.clear()
    manager.load(path, *training_states(fresh, fresh_optimizer, fresh_scheduler, None))
    assert len(fresh_optimizer.state) == len(params)  # nothing was dropped: every parameter had a saved state
    _load_optimizer_strictly(fresh, fresh_optimizer, path)
    got = _optimizer_tensors(fresh, fresh_optimizer)
    assert set(got) == set(expected) and len(expected) == 3 * len(params)  # step, exp_avg, exp_avg_sq
    assert all(torch.equal(got[key], value) for key, value in expected.items())
    batch = _batch(vlm, seed=5)
    assert torch.equal(fresh(**batch).loss, vlm(**batch).loss)


def test_strict_loading_fails_when_the_unused_tail_is_trainable(tmp_path, process_group):
    """The negative control: with the never-updated tail in the optimizer (the previous behaviour), the checkpoint
    lacks their state and strict loading fails, which `_drop_unsaved_optimizer_state` used to work around."""
    from torch.distributed.checkpoint.api import CheckpointException

    from vla_train.training.checkpoint import CheckpointManager
    from vla_train.training.checkpoint_state import training_states

    vlm, optimizer, scheduler = _trained_vla_full_train(old_behaviour=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unused = sum(1 for m in vlm.vision_backbone.unused_modules() for _ in m.parameters())
    assert len(params) - len(optimizer.state) == unused == 43
    path = CheckpointManager(tmp_path).save(2, 0, 1.0, *training_states(vlm, optimizer, scheduler, None))
    fresh, fresh_optimizer, _ = _trained_vla_full_train(old_behaviour=True)
    fresh_optimizer.state.clear()  # as on resume: a fresh optimizer gets a template state for every parameter
    with pytest.raises(CheckpointException, match=r"blocks\.2\."):
        _load_optimizer_strictly(fresh, fresh_optimizer, path)
