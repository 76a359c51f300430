"""π0 recipes (`--vla.type pi0-...`): openpi's LIBERO fine-tuning setup as a registry entry, and a tiny one.

π0 fine-tunes every weight of PaliGemma (SigLIP + Gemma 2B) and the Gemma 300M action expert with flow matching on
50-step chunks of MEAN_STD-normalized actions, a third-person + wrist camera and the 8-D LIBERO state, batch 32,
30k steps, AdamW (beta 0.9 / 0.95, eps 1e-8, weight decay 1e-10), gradient clipping at 1.0, a 1k-step linear warmup
to 2.5e-5 then a cosine to 2.5e-6 at the last step, and an EMA of the weights with decay 0.99 (openpi `pi0_libero`).
The base is `pi0-paligemma-224px`: start from LeRobot's π0 weights imported as a run directory
(`vla-scripts/import_pi0_lerobot.py`, README "π0") with `--pretrained_checkpoint`, or from the registry id (random
weights, for size checks). `tiny-pi0` trains the tiny PaliGemma on the synthetic `demo_libero` dataset (tests and the
demo).
"""

from dataclasses import dataclass, field
from pathlib import Path

from vla_train.config.lora import LoRAConfig
from vla_train.config.policy import Pi0PolicyConfig, PolicyConfig
from vla_train.config.vla import VLAConfig


def _policy() -> PolicyConfig:
    return Pi0PolicyConfig(chunk_length=50, action_dim=7, proprio_dim=8, cameras=["primary", "wrist"])


@VLAConfig.register_subclass("pi0-libero")
@dataclass
class Pi0_LIBERO(VLAConfig):
    """π0 on the LIBERO suites (openpi `pi0_libero`: the four suites mixed), full fine-tuning."""

    vla_id: str = "pi0-libero"
    base_vlm: str | Path = "pi0-paligemma-224px"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "libero_4_task_suites_no_noops"
    shuffle_buffer_size: int = 100_000
    epochs: int = 1000
    max_steps: int | None = 30_000
    expected_world_size: int = 8
    global_batch_size: int = 32
    per_device_batch_size: int = 4
    learning_rate: float = 2.5e-5
    weight_decay: float = 1e-10
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "warmup-steps+cosine-to-min"
    warmup_ratio: float = 0.0
    train_strategy: str = "full-shard"
    policy: PolicyConfig = field(default_factory=_policy)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    warmup_steps: int | None = 1_000
    min_learning_rate: float | None = 2.5e-6
    ema_decay: float | None = 0.99


def pi0_lora() -> LoRAConfig:
    """openpi's π0 LoRA variants: adapters on every linear layer of both Gemma stacks, r=16 for PaliGemma's Gemma
    (`gemma_2b_lora`) and r=32 for the action expert (`gemma_300m_lora`), alpha = r; SigLIP and the projector train in
    full, the suffix projections too (always)."""
    return LoRAConfig(enabled=True, rank=16, alpha=16, modules=["llm_backbone"],
                      full_modules=["vision_backbone", "projector"], rank_pattern={r"expert\..*": 32})


@VLAConfig.register_subclass("pi0-libero-lora")
@dataclass
class Pi0_LIBERO_LoRA(Pi0_LIBERO):
    """π0 on LIBERO with openpi's LoRA variants (`pi0_libero_low_mem_finetune`: no EMA), for one smaller GPU."""

    vla_id: str = "pi0-libero-lora"
    lora: LoRAConfig = field(default_factory=pi0_lora)
    ema_decay: float | None = None


def _tiny_policy() -> PolicyConfig:
    # demo_libero's proprio: EEF (6) + a padding column + gripper fingers (2)
    return Pi0PolicyConfig(chunk_length=4, action_dim=7, proprio_dim=9, cameras=["primary", "wrist"], expert="tiny",
                           num_inference_steps=3)


@VLAConfig.register_subclass("tiny-pi0")
@dataclass
class TinyPi0(Pi0_LIBERO):
    """Tests and the demo: the tiny PaliGemma with a tiny action expert on `demo_libero`, 2 processes."""

    vla_id: str = "tiny-pi0"
    base_vlm: str | Path = "tiny-pi0-paligemma"
    data_mix: str = "demo_libero"
    shuffle_buffer_size: int = 64
    max_steps: int | None = 6
    expected_world_size: int = 2
    global_batch_size: int = 4
    per_device_batch_size: int = 2
    learning_rate: float = 1e-3
    policy: PolicyConfig = field(default_factory=_tiny_policy)
    warmup_steps: int | None = 1
    min_learning_rate: float | None = 1e-4
