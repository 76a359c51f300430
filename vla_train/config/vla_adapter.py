"""VLA-Adapter recipes (`--vla.type vla-adapter-...`): its published setups as registry entries.

VLA-Adapter trains the MiniVLA base (`prism-qwen25-extra-dinosiglip-224px+0_5b`: Qwen2.5-0.5B + DINOv2/SigLIP) as a
`vla-adapter` policy with LoRA r=64, alpha=2r on all linear layers (the ActionQueries, the Bridge policy and the proprio
projector train in full), L1 loss, chunks of 8, a third-person + wrist camera and 8-D proprio, AdamW at 5e-4 with no
decay before 100k steps, 4 GPUs x 16 (Pro). On one consumer GPU its README uses 2e-4 and batch 8: pass
`--vla.learning_rate 2e-4 --vla.expected_world_size 1 --vla.global_batch_size 8 --vla.per_device_batch_size 8`.
`tiny-vla-adapter` trains the tiny Qwen base on the synthetic `demo_libero` dataset (tests and the demo).
"""

from dataclasses import dataclass, field
from pathlib import Path

from vla_train.config.lora import LoRAConfig
from vla_train.config.policy import PolicyConfig, VLAAdapterPolicyConfig
from vla_train.config.vla import VLAConfig


def _policy() -> PolicyConfig:
    return VLAAdapterPolicyConfig(chunk_length=8, action_dim=7, proprio_dim=8, cameras=["primary", "wrist"],
                                  num_action_queries=64, block="pro")


@VLAConfig.register_subclass("vla-adapter-libero-spatial")
@dataclass
class VLAAdapter_LIBERO_Spatial(VLAConfig):
    """VLA-Adapter-Pro on LIBERO-Spatial: 64 ActionQueries, Bridge policy over 24 layers, LoRA r=64."""

    vla_id: str = "vla-adapter-libero-spatial"
    base_vlm: str | Path = "prism-qwen25-extra-dinosiglip-224px+0_5b"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "libero_spatial_no_noops"
    shuffle_buffer_size: int = 100_000
    epochs: int = 1000
    max_steps: int | None = 100_000
    expected_world_size: int = 4
    global_batch_size: int = 64
    per_device_batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "step-decay"
    warmup_ratio: float = 0.0
    train_strategy: str = "full-shard"
    policy: PolicyConfig = field(default_factory=_policy)
    lr_decay_steps: int | None = 100_000
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=True, rank=64, alpha=128))


@VLAConfig.register_subclass("vla-adapter-libero-object")
@dataclass
class VLAAdapter_LIBERO_Object(VLAAdapter_LIBERO_Spatial):
    vla_id: str = "vla-adapter-libero-object"
    data_mix: str = "libero_object_no_noops"


@VLAConfig.register_subclass("vla-adapter-libero-goal")
@dataclass
class VLAAdapter_LIBERO_Goal(VLAAdapter_LIBERO_Spatial):
    vla_id: str = "vla-adapter-libero-goal"
    data_mix: str = "libero_goal_no_noops"


@VLAConfig.register_subclass("vla-adapter-libero-10")
@dataclass
class VLAAdapter_LIBERO_10(VLAAdapter_LIBERO_Spatial):
    vla_id: str = "vla-adapter-libero-10"
    data_mix: str = "libero_10_no_noops"


@VLAConfig.register_subclass("vla-adapter-calvin")
@dataclass
class VLAAdapter_CALVIN(VLAAdapter_LIBERO_Spatial):
    """VLA-Adapter-Pro on CALVIN ABC (evaluated ABC->D): static + gripper camera, 8-D proprio."""

    vla_id: str = "vla-adapter-calvin"
    data_mix: str = "calvin_abc"


def _tiny_policy() -> PolicyConfig:
    # demo_libero's proprio: EEF (6) + a padding column + gripper fingers (2); 16 queries keep the test sequence short
    return VLAAdapterPolicyConfig(chunk_length=4, action_dim=7, proprio_dim=9, cameras=["primary", "wrist"],
                                  num_action_queries=16, block="pro")


@VLAConfig.register_subclass("tiny-vla-adapter")
@dataclass
class TinyVLAAdapter(VLAAdapter_LIBERO_Spatial):
    """Tests and the demo: the tiny Qwen base VLM as a VLA-Adapter policy on `demo_libero`, 2 processes, LoRA r=8."""

    vla_id: str = "tiny-vla-adapter"
    base_vlm: str | Path = "tiny-dinosiglip+tiny-qwen25"
    data_mix: str = "demo_libero"
    shuffle_buffer_size: int = 64
    max_steps: int | None = 6
    expected_world_size: int = 2
    global_batch_size: int = 4
    per_device_batch_size: int = 2
    policy: PolicyConfig = field(default_factory=_tiny_policy)
    lr_decay_steps: int | None = 4
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=True, rank=8, alpha=16))
