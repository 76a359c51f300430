"""Optimizer groups (also after activation checkpointing + FSDP2), step budget and LR schedules."""

import itertools
import math

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from tests.conftest import build_tiny
from vla_train.training.optim import (
    ADAMW_BETAS,
    ADAMW_EPS,
    build_lr_scheduler,
    build_optimizer,
    canonical_name,
    num_training_steps,
    record_parameter_shapes,
    split_decay_parameters,
)

MODEL_ID = "tiny-dinosiglip+tiny-llama"




def _names(pairs):
    return [canonical_name(n) for n, _ in pairs]


def test_split_follows_original_shapes_and_bias_names():
    model = build_tiny(MODEL_ID)
    for p in model.vision_backbone.parameters():
        p.requires_grad_(False)
    shapes = record_parameter_shapes(model)
    decay, no_decay = split_decay_parameters(model, shapes)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(_names(decay)) | set(_names(no_decay)) == trainable
    assert not set(_names(decay)) & set(_names(no_decay))
    assert all(not n.startswith("vision_backbone.") for n in trainable)
    assert "llm_backbone.llm.model.layers.0.self_attn.q_proj.weight" in _names(decay)
    assert "llm_backbone.llm.model.norm.weight" in _names(no_decay)
    assert all(len(shapes[n]) >= 2 and not n.endswith(".bias") for n in _names(decay))
    assert all(len(shapes[n]) < 2 or n.endswith(".bias") for n in _names(no_decay))
    assert any(n.endswith(".bias") for n in _names(no_decay))  # projector biases

    opt = build_optimizer(model, learning_rate=2e-5, weight_decay=0.1, original_shapes=shapes)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for _, p in decay]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for _, p in no_decay]
    assert opt.defaults["betas"] == ADAMW_BETAS and opt.defaults["eps"] == ADAMW_EPS
    assert opt.defaults["lr"] == 2e-5


def test_unknown_shape_is_a_clear_error():
    model = build_tiny(MODEL_ID)
    shapes = record_parameter_shapes(model)
    del shapes["llm_backbone.llm.model.norm.weight"]
    with pytest.raises(ValueError, match=r"llm_backbone\.llm\.model\.norm\.weight.*record_parameter_shapes"):
        build_optimizer(model, 1e-4, 0.0, shapes)


def test_split_identical_after_checkpointing_and_fully_shard(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference = build_tiny(MODEL_ID)
    ref_decay, ref_no_decay = split_decay_parameters(reference, record_parameter_shapes(reference))

    model = build_tiny(MODEL_ID)
    shapes = record_parameter_shapes(model)
    units = model.fsdp_unit_classes()
    layer_cls = model.llm_backbone.transformer_layer_cls
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_cls))
    mesh = init_device_mesh("cpu", (1,))
    for module in list(model.modules()):
        if isinstance(module, units):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module." in n for n in names)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    decay, no_decay = split_decay_parameters(model, shapes)
    assert _names(decay) == _names(ref_decay)
    assert _names(no_decay) == _names(ref_no_decay)
    assert decay and no_decay
    opt = build_optimizer(model, 1e-4, 0.01, shapes)
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]


def test_ddp_style_module_prefix_is_resolved():
    model = build_tiny(MODEL_ID)
    shapes = record_parameter_shapes(model)
    wrapper = torch.nn.Module()
    wrapper.module = model
    decay, no_decay = split_decay_parameters(wrapper, shapes)
    ref_decay, ref_no_decay = split_decay_parameters(model, shapes)
    assert [id(p) for _, p in decay] == [id(p) for _, p in ref_decay]
    assert [id(p) for _, p in no_decay] == [id(p) for _, p in ref_no_decay]


@pytest.mark.parametrize(
    ("max_steps", "epochs", "length", "gbs", "expected"),
    [
        (500, 1000, 10, 256, 500),
        (None, 2, 1000, 256, 8),  # ceil(1000 / 256) * 256 = 1024; 1024 * 2 // 256
        (None, 1, 1024, 256, 4),
        (None, 3, 1, 256, 3),
        (None, 1000, 1_000_000, 2048, 489_000),  # ceil -> 489 batches per epoch
    ],
)
def test_num_training_steps(max_steps, epochs, length, gbs, expected):
    assert num_training_steps(max_steps, epochs, length, gbs) == expected


def test_num_training_steps_rejects_bad_values():
    with pytest.raises(ValueError, match="global_batch_size"):
        num_training_steps(None, 1, 10, 0)
    with pytest.raises(ValueError, match="epochs"):
        num_training_steps(None, 0, 10, 2)


def _optimizer(lr: float = 1e-3) -> torch.optim.AdamW:
    model = torch.nn.Linear(3, 2)
    return build_optimizer(model, lr, 0.0, record_parameter_shapes(model))


def _lrs(opt, sched, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_matches_closed_form():
    base, total, ratio = 1e-3, 100, 0.1
    opt = _optimizer(base)
    sched = build_lr_scheduler(opt, "linear-warmup+cosine-decay", total, ratio)
    lrs = [row[0] for row in _lrs(opt, sched, total + 1)]
    warmup = int(total * ratio)
    for step, lr in enumerate(lrs):
        if step < warmup:
            expected = base * step / warmup
        else:
            expected = base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lr == pytest.approx(expected, abs=1e-12), step
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(base) and lrs[total] == pytest.approx(0.0, abs=1e-15)
    assert lrs[5] == pytest.approx(base / 2)
    assert lrs[55] == pytest.approx(base / 2)  # the cosine's midpoint


def test_constant_schedule_and_unknown_kind():
    opt = _optimizer(3e-4)
    sched = build_lr_scheduler(opt, "constant", 10, 0.5)
    assert all(row == [3e-4, 3e-4] for row in _lrs(opt, sched, 5))
    with pytest.raises(ValueError, match="linear-warmup\\+cosine-decay"):
        build_lr_scheduler(opt, "cosine", 10, 0.1)


@pytest.mark.parametrize("kind", ["linear-warmup+cosine-decay", "constant"])
def test_scheduler_state_dict_restores_exactly(kind):
    total, k = 50, 17
    opt = _optimizer()
    sched = build_lr_scheduler(opt, kind, total, 0.2)
    _lrs(opt, sched, k)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    expected = _lrs(opt, sched, total - k)

    opt2 = _optimizer()
    sched2 = build_lr_scheduler(opt2, kind, total, 0.2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == k
    assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]
    assert _lrs(opt2, sched2, total - k) == expected


def test_adamw_hyper_parameters_are_passed_and_default_to_the_config_defaults():
    from vla_train.config.vla import TinyTest

    cfg = TinyTest()
    assert (cfg.adam_betas, cfg.adam_eps) == (ADAMW_BETAS, ADAMW_EPS) == ((0.9, 0.999), 1e-8)  # as before the options
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, 1e-3, 0.0, record_parameter_shapes(model), betas=(0.9, 0.95), eps=1e-6)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)


def _min_lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """openpi's CosineDecaySchedule shape, as transformers computes it: linear 0 -> 1 over `warmup` steps, then a
    half-cosine from 1 down to `floor` (min_learning_rate / learning_rate) at `total`."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("warmup", "total"), [(10, 100), (0, 40), (3, 4)])
def test_warmup_steps_cosine_to_min_matches_closed_form(warmup, total):
    base, floor_lr = 2.5e-5, 2.5e-6
    opt = _optimizer(base)
    sched = build_lr_scheduler(opt, "warmup-steps+cosine-to-min", total, 0.0, warmup_steps=warmup,
                               min_learning_rate=floor_lr)
    lrs = [row[0] for row in _lrs(opt, sched, total + 1)]
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(base * _min_lr_factor(step, warmup, total, floor_lr / base), rel=1e-12), step
    assert lrs[0] == (0.0 if warmup else pytest.approx(base))  # step 0
    assert lrs[warmup] == pytest.approx(base)  # end of warmup: the peak
    if (total - warmup) % 2 == 0:
        assert lrs[warmup + (total - warmup) // 2] == pytest.approx((base + floor_lr) / 2)  # the cosine's midpoint
    assert lrs[total] == pytest.approx(floor_lr)  # the end of the step budget: the floor
    assert all(a <= b for a, b in itertools.pairwise(lrs[:warmup + 1]))  # rising warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[warmup:]))  # decaying cosine


def test_warmup_steps_cosine_to_min_restores_exactly_and_checks_its_options():
    kind, total, k = "warmup-steps+cosine-to-min", 30, 11
    opt = _optimizer()
    sched = build_lr_scheduler(opt, kind, total, 0.0, warmup_steps=5, min_learning_rate=1e-4)
    _lrs(opt, sched, k)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    expected = _lrs(opt, sched, total - k)
    opt2 = _optimizer()
    sched2 = build_lr_scheduler(opt2, kind, total, 0.0, warmup_steps=5, min_learning_rate=1e-4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert _lrs(opt2, sched2, total - k) == expected
    with pytest.raises(ValueError, match=r"--vla\.warmup_steps and --vla\.min_learning_rate"):
        build_lr_scheduler(_optimizer(), kind, total, 0.0, warmup_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps = 30 is outside \[0, 30\).*--vla\.warmup_steps"):
        build_lr_scheduler(_optimizer(), kind, total, 0.0, warmup_steps=30, min_learning_rate=0.0)
    with pytest.raises(ValueError, match=r"min_learning_rate = 0\.01 is outside.*--vla\.min_learning_rate"):
        build_lr_scheduler(_optimizer(1e-3), kind, total, 0.0, warmup_steps=0, min_learning_rate=1e-2)
