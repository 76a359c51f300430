"""ModelEMA: the average of the trainable weights (numpy recurrence), `swapped_in`, its state dict, and — on the tiny
VLM under FSDP2 (one gloo process) — DTensor shadows placed as the parameters, the DCP round trip, the resume checks
and the consolidated `.pt` holding the EMA weights."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from tests.conftest import build_tiny
from vla_train.models.freezing import freeze_backbones
from vla_train.training.checkpoint import CheckpointManager
from vla_train.training.checkpoint_io import consolidated_path
from vla_train.training.checkpoint_state import EMA, training_states
from vla_train.training.distributed import DistributedContext
from vla_train.training.ema import ModelEMA
from vla_train.training.parallelize import parallelize_vlm

MODEL_ID = "tiny-dinosiglip+tiny-qwen25"  # its LM head is tied to the input embeddings
CPU_CONTEXT = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                                 backend="gloo")


class _Tied(nn.Module):
    """Two linear layers sharing one weight (as a tied LM head), a LayerNorm, and a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x))) + self.frozen.sum()


def _sgd_steps(model: nn.Module, ema: ModelEMA | None, steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`steps` SGD steps on random data (EMA updated after each); the trainable weights after each step (float64)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    history = []
    for _ in range(steps):
        model(torch.randn(5, 4, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        history.append({n: p.detach().double().numpy().copy() for n, p in model.named_parameters() if p.requires_grad})
    return history


def test_update_follows_the_ema_recurrence():
    model = _Tied()
    initial = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    decay = 0.9
    ema = ModelEMA(model, decay)
    history = _sgd_steps(model, ema, steps=7)
    expected = dict(initial)
    for weights in history:  # shadow_t = decay * shadow_{t-1} + (1 - decay) * param_t, shadow_0 = param_0
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}
    state = ema.state_dict()
    assert set(state) == {"embed.weight", "head.weight", "norm.weight", "norm.bias"}  # every key; frozen left out
    assert state["head.weight"] is state["embed.weight"]  # the tied weight: one shadow
    for name in expected:
        value = state[name]
        assert value.dtype == torch.float32
        np.testing.assert_allclose(value.double().numpy(), expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.allclose(value.double().numpy(), history[-1][name])  # an average, not the last weights
    full = ema.full_state_dict()
    assert set(full) == {"embed.weight", "head.weight", "norm.weight", "norm.bias"}  # every state-dict key
    assert full["head.weight"] is full["embed.weight"] and torch.equal(full["embed.weight"], state["embed.weight"])
    assert full["embed.weight"].data_ptr() != state["embed.weight"].data_ptr()  # a copy, not the live shadow


def test_swapped_in_holds_the_ema_and_restores_the_weights_exactly():
    model = _Tied()
    ema = ModelEMA(model, 0.5)
    _sgd_steps(model, ema, steps=3)
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert torch.equal(model.head.weight, ema.state_dict()["embed.weight"])
        assert torch.equal(model.norm.bias, ema.state_dict()["norm.bias"])
        assert torch.equal(model.frozen, trained["frozen"])  # frozen: untouched
    assert all(torch.equal(model.state_dict()[n], t) for n, t in trained.items())
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in(model):
        raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[n], t) for n, t in trained.items())  # restored on an error too
    with pytest.raises(ValueError, match="not the ones this EMA averages"), ema.swapped_in(_Tied()):
        pass


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    model = _Tied()
    ema = ModelEMA(model, 0.8)
    _sgd_steps(model, ema, steps=2)
    saved = {n: t.clone() for n, t in ema.state_dict().items()}

    other = _Tied()
    other.load_state_dict(model.state_dict())
    restored = ModelEMA(other, 0.8)  # starts from the current weights, not the average
    assert not all(torch.equal(restored.state_dict()[n], t) for n, t in saved.items())
    restored.load_state_dict(saved)
    assert all(torch.equal(restored.state_dict()[n], t) for n, t in saved.items())
    _sgd_steps(model, ema, steps=3, seed=5)
    _sgd_steps(other, restored, steps=3, seed=5)
    assert all(torch.equal(restored.state_dict()[n], t) for n, t in ema.state_dict().items())  # bit for bit
    with pytest.raises(ValueError, match=r"missing \['norm.bias'\].*unexpected \['x'\]"):
        restored.load_state_dict({("x" if n == "norm.bias" else n): t for n, t in saved.items()})


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match=r"--vla\.ema_decay in \(0, 1\)"):
        ModelEMA(_Tied(), decay)


def test_non_fp32_trainable_parameters_are_refused():
    with pytest.raises(ValueError, match="not FP32"):
        ModelEMA(_Tied().to(torch.bfloat16), 0.9)


# ----------------------------------------------------------------------------------------- tiny VLM under FSDP2
def _batch(vlm, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = vlm.llm_backbone.llm.config.vocab_size
    input_ids = torch.randint(3, vocab, (2, 8), generator=generator)
    input_ids[:, 0] = 1
    labels = input_ids.clone()
    labels[:, :4] = -100
    size = vlm.vision_backbone.spec.image_size
    pixels = {key: torch.randn(2, 3, size, size, generator=generator) for key in vlm.vision_backbone.keys}
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels,
            "labels": labels}


def _sharded_vlm(steps: int, ema_decay: float | None = 0.9) -> tuple:
    """The tiny VLM (frozen vision) sharded by FSDP2 with activation checkpointing, after `steps` AdamW steps."""
    vlm = build_tiny(MODEL_ID)
    freeze_backbones(vlm, "vla-train")
    parallelize_vlm(vlm, CPU_CONTEXT, strategy="full-shard", stage="vla-train", mixed_precision=False,
                    activation_checkpointing=True)
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ema = ModelEMA(vlm, ema_decay) if ema_decay is not None else None
    for seed in range(steps):
        vlm(**_batch(vlm, seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
    return vlm, optimizer, scheduler, ema


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def test_sharded_shadows_checkpoint_round_trip_and_consolidated_weights(tmp_path, process_group):
    vlm, optimizer, scheduler, ema = _sharded_vlm(steps=2)
    params = dict(vlm.named_parameters())
    assert any("_checkpoint_wrapped_module" in name for name in params)
    for shadow, param in zip(ema.shadow, ema.params, strict=True):
        assert isinstance(shadow, DTensor) and shadow.placements == param.placements
        assert shadow.device_mesh == param.device_mesh and shadow.to_local().shape == param.to_local().shape
        assert shadow.dtype == torch.float32 and not shadow.requires_grad
    model_keys = set(get_model_state_dict(vlm))
    trainable = {n.replace("._checkpoint_wrapped_module", "") for n, p in
                 vlm.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert set(ema.state_dict()) == trainable and trainable < model_keys  # keyed like the model's state dict
    assert len(trainable) == len(ema.shadow) + 1  # the tied LM head: one shadow under two keys
    expected = {n: _full(t).clone() for n, t in ema.state_dict().items()}

    manager = CheckpointManager(tmp_path, save_consolidated="every")
    path = manager.save(2, 0, 1.0, *training_states(vlm, optimizer, scheduler, None, ema))
    weights = get_model_state_dict(vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = torch.load(consolidated_path(path), weights_only=True)["model"]
    flat = {f"{module}.{key}": tensor for module, state in saved.items() for key, tensor in state.items()}
    assert set(flat) == set(weights)
    for key, tensor in flat.items():  # the EMA for trainable tensors, the model's weights for the frozen ones
        assert torch.equal(tensor, expected[key] if key in expected else weights[key]), key
    assert any(not torch.equal(expected[key], weights[key]) for key in expected)  # EMA != trained weights

    fresh, fresh_optimizer, fresh_scheduler, fresh_ema = _sharded_vlm(steps=1)  # other weights, other average
    manager.load(path, *training_states(fresh, fresh_optimizer, fresh_scheduler, None, fresh_ema))
    assert all(torch.equal(_full(t), expected[n]) for n, t in fresh_ema.state_dict().items())
    with torch.no_grad():  # the root keeps its parameters gathered after a forward: swapped_in reshards first
        fresh(**_batch(fresh, 9))
    with fresh_ema.swapped_in(fresh):
        swapped = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        assert all(torch.equal(swapped[key], tensor) for key, tensor in flat.items())
    after = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert all(torch.equal(after[key], weights[key]) for key in weights)  # the trained weights are back


def test_resume_needs_the_same_ema_option(tmp_path, process_group):
    vlm, optimizer, scheduler, ema = _sharded_vlm(steps=1)
    with_ema = CheckpointManager(tmp_path / "ema", save_consolidated="never")
    path = with_ema.save(1, 0, 1.0, *training_states(vlm, optimizer, scheduler, None, ema))
    states, _ = training_states(vlm, optimizer, scheduler, None, ema)
    assert EMA in states
    with pytest.raises(ValueError, match=r"saved with --vla\.ema_decay .* this run has it off"):
        with_ema.load(path, *training_states(vlm, optimizer, scheduler, None))
    without = CheckpointManager(tmp_path / "plain", save_consolidated="never")
    plain = without.save(1, 0, 1.0, *training_states(vlm, optimizer, scheduler, None))
    with pytest.raises(ValueError, match=r"saved without --vla\.ema_decay .* this run sets it"):
        without.load(plain, *training_states(vlm, optimizer, scheduler, None, ema))
    without.load(plain, *training_states(vlm, optimizer, scheduler, None))  # the same option loads
