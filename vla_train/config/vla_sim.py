"""MetaWorld recipes (`--vla.type metaworld-...`): small policies trained on scripted-expert demonstrations.

Both train the tiny base VLM (`tiny-dinosiglip+tiny-llama`, built from its seeded random init; 64x64 px images) as
one multi-task, instruction-conditioned OFT policy: L1 head, chunks of 8 actions, proprio (EEF xyz + gripper
opening), third-person (`primary`) + wrist camera, on mixtures written by `vla-scripts/make_sim_data.py
--image_size 64 --episodes_per_task 60` (commands and results: docs/benchmarks.md, "MetaWorld closed-loop
benchmark"):
- `metaworld-oft-tiny`: `metaworld_bench` (`--name bench`), 8 short tasks, 5,000 steps (~36 min);
- `metaworld-oft-tiny-b7`: `metaworld_bench7` (`--name bench7`), 7 tasks whose object or goal position decides the
  motion (the mean action solves the drawer, door and handle-press tasks of `bench`, which say little), 3,500 steps
  (~27 min on an idle machine);
- `metaworld-vla-adapter-tiny-b7`: the same base, data, cameras, proprio, chunks and schedule as a VLA-Adapter policy
  (64 ActionQueries, Pro Bridge blocks over both LLM layers): the VLA-Adapter row of the benchmark;
- `metaworld-pi0-tiny-b7`: the same data, cameras, proprio, chunks and schedule as a π0 policy on the tiny PaliGemma
  base (`tiny-pi0-paligemma`, a tiny action expert, flow matching, 10 Euler steps, EMA 0.99 as openpi): the π0 row.

Why these values: a run must take under one hour on a 2-core CPU (2 processes, the only parallelism there is). At
batch 32 a step takes ~0.42-0.48 s on the idle machine, so the step budgets see each of the ~22-26k demo frames 5-6
times. lr 1e-3 with a 2 % warmup and cosine decay to 0 (a from-scratch tiny model tolerates a high lr; the decay
settles the L1 regression at the end); no weight decay, as OFT. Chunks of 8 (executed 4 at a time in evaluation)
smooth the expert's saturated actions; the wrist camera sees the button, handle or plate the hand must reach.
"""

from dataclasses import dataclass, field
from pathlib import Path

from vla_train.config.policy import OFTPolicyConfig, Pi0PolicyConfig, PolicyConfig, VLAAdapterPolicyConfig
from vla_train.config.sim_eval import SIM_ACTION_DIM, SIM_PROPRIO_DIM
from vla_train.config.vla import VLAConfig


def _metaworld_policy() -> PolicyConfig:
    return OFTPolicyConfig(head="l1", chunk_length=8, action_dim=SIM_ACTION_DIM,
                           proprio_dim=SIM_PROPRIO_DIM, cameras=["primary", "wrist"])


@VLAConfig.register_subclass("metaworld-oft-tiny")
@dataclass
class MetaWorldOFT_Tiny(VLAConfig):
    """The tiny base VLM as a multi-task OFT L1 policy on `metaworld_bench`; ~36 min on a 2-core CPU, 2 processes."""

    vla_id: str = "metaworld-oft-tiny"
    base_vlm: str | Path = "tiny-dinosiglip+tiny-llama"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "metaworld_bench"
    shuffle_buffer_size: int = 10_000
    epochs: int = 1000
    max_steps: int | None = 5000
    expected_world_size: int = 2
    global_batch_size: int = 32
    per_device_batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear-warmup+cosine-decay"
    warmup_ratio: float = 0.02
    train_strategy: str = "full-shard"
    policy: PolicyConfig = field(default_factory=_metaworld_policy)


@VLAConfig.register_subclass("metaworld-oft-tiny-b7")
@dataclass
class MetaWorldOFT_Tiny_B7(MetaWorldOFT_Tiny):
    """As `metaworld-oft-tiny` on `metaworld_bench7` (7 tasks the mean action cannot solve), 3,500 steps."""

    vla_id: str = "metaworld-oft-tiny-b7"
    data_mix: str = "metaworld_bench7"
    max_steps: int | None = 3500


def _metaworld_adapter_policy() -> PolicyConfig:
    return VLAAdapterPolicyConfig(chunk_length=8, action_dim=SIM_ACTION_DIM, proprio_dim=SIM_PROPRIO_DIM,
                                  cameras=["primary", "wrist"], num_action_queries=64, block="pro")


@VLAConfig.register_subclass("metaworld-vla-adapter-tiny-b7")
@dataclass
class MetaWorldVLAAdapter_Tiny_B7(MetaWorldOFT_Tiny_B7):
    """As `metaworld-oft-tiny-b7` with the VLA-Adapter policy instead of OFT's (same base, data and schedule)."""

    vla_id: str = "metaworld-vla-adapter-tiny-b7"
    policy: PolicyConfig = field(default_factory=_metaworld_adapter_policy)


def _metaworld_pi0_policy() -> PolicyConfig:
    return Pi0PolicyConfig(chunk_length=8, action_dim=SIM_ACTION_DIM, proprio_dim=SIM_PROPRIO_DIM,
                           cameras=["primary", "wrist"], expert="tiny", num_inference_steps=10)


@VLAConfig.register_subclass("metaworld-pi0-tiny-b7")
@dataclass
class MetaWorldPi0_Tiny_B7(MetaWorldOFT_Tiny_B7):
    """As `metaworld-oft-tiny-b7` with the π0 policy on the tiny PaliGemma base (same data and schedule), EMA 0.99."""

    vla_id: str = "metaworld-pi0-tiny-b7"
    base_vlm: str | Path = "tiny-pi0-paligemma"
    policy: PolicyConfig = field(default_factory=_metaworld_pi0_policy)
    ema_decay: float | None = 0.99
