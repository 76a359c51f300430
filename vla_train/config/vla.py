"""VLAConfig: what a VLA training run trains (base VLM, freezing stage, data mixture) and with which recipe.

A draccus `ChoiceRegistry`: `--vla.type <vla_id>` selects an entry, and `--vla.<field> <value>` overrides a field.
Registered: the reference's 11 entries (facts §2.2, same ids and values) and two tiny ones for the demo and tests.

Differences from the reference, all checked in `validate()` before any work:
- gradient accumulation is supported (`gbs = pdbs * world_size * accumulation_steps`); the reference required
  `gbs == pdbs * world_size` for VLA training;
- train strategies name the FSDP sharding they run (`TRAIN_STRATEGIES`, the one list; `training/parallelize.py`
  imports it). The reference's ids keep the reference's semantics (`resolve_train_strategy`): its `fsdp-full-shard`
  ran *hybrid* sharding (`HYBRID_SHARD`: full shard within a node, replicated across nodes) and `fsdp-shard-grad-op`
  ran `_HYBRID_SHARD_ZERO2`, so on several nodes they resolve to `hybrid-shard` / `hybrid-shard-grad-op`, and on one
  node (where hybrid sharding is full sharding) to `full-shard` / `shard-grad-op`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import draccus

from vla_train.config.lora import LoRAConfig
from vla_train.config.policy import PolicyConfig, default_policy

LR_SCHEDULERS = ("constant", "linear-warmup+cosine-decay", "step-decay", "warmup-steps+cosine-to-min")
ADAMW_BETAS = (0.9, 0.999)  # the one place of the AdamW defaults (`--vla.adam_betas`, `training/optim.py`)
ADAMW_EPS = 1e-8
TRAIN_STRATEGIES = {
    "full-shard": "ZeRO-3: parameters, gradients and optimizer state sharded across all ranks",
    "shard-grad-op": "ZeRO-2: gradients and optimizer state sharded; parameters stay unsharded after forward",
    "hybrid-shard": "full shard within a node, replicated across nodes (2-D mesh: replicate x shard)",
    "hybrid-shard-grad-op": "shard-grad-op within a node, replicated across nodes (2-D mesh: replicate x shard)",
}
# The reference's ids -> (strategy on one node, strategy on several nodes): the sharding the reference ran.
TRAIN_STRATEGY_ALIASES = {
    "fsdp-full-shard": ("full-shard", "hybrid-shard"),
    "fsdp-shard-grad-op": ("shard-grad-op", "hybrid-shard-grad-op"),
}
HYBRID_STRATEGIES = ("hybrid-shard", "hybrid-shard-grad-op")  # 2-D device mesh (replicate across nodes, shard within)
RESHARDING_STRATEGIES = ("full-shard", "hybrid-shard")  # parameters re-sharded after forward (else kept gathered)


def resolve_train_strategy(train_strategy: str, num_nodes: int = 1) -> str:
    """The strategy that runs for `train_strategy` on `num_nodes` nodes: a reference id resolves to the sharding the
    reference ran (hybrid on several nodes, where it differs from full sharding); a strategy name is itself."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes = {num_nodes} must be positive. Fix: launch at least one node.")
    if train_strategy in TRAIN_STRATEGY_ALIASES:
        one_node, several_nodes = TRAIN_STRATEGY_ALIASES[train_strategy]
        return several_nodes if num_nodes > 1 else one_node
    if train_strategy not in TRAIN_STRATEGIES:
        raise ValueError(f"Unknown train_strategy {train_strategy!r}. Fix: pass --vla.train_strategy one of "
                         f"{[*TRAIN_STRATEGIES, *TRAIN_STRATEGY_ALIASES]}.")
    return train_strategy


@dataclass
class VLAConfig(draccus.ChoiceRegistry):
    """A VLA training recipe. Field names and defaults match the reference's `prismatic/conf/vla.py`."""

    vla_id: str  # registry id; the run id starts with it
    base_vlm: str | Path  # a ModelConfig id (builds seeded weights) or a base-VLM run directory; kept as str
    freeze_vision_backbone: bool  # keep the vision backbone frozen
    freeze_llm_backbone: bool  # keep the LLM frozen (then unfreeze_last_llm_layer must be True)
    unfreeze_last_llm_layer: bool  # train the LLM's embeddings, last decoder layer and head while it is frozen

    data_mix: str  # named mixture of rlds_mixtures/mixtures.yaml (or a single dataset name)
    shuffle_buffer_size: int  # frames per rank in the shuffle buffer

    epochs: int  # nominal epochs: sets the step budget when max_steps is None
    max_steps: int | None  # gradient-step budget; overrides epochs when set
    expected_world_size: int  # number of processes (GPUs) this recipe is laid out for

    global_batch_size: int  # examples per gradient step, over all ranks and accumulation steps
    per_device_batch_size: int  # examples per forward/backward on one rank
    learning_rate: float  # peak AdamW learning rate
    weight_decay: float  # AdamW weight decay (not applied to biases and norms)
    max_grad_norm: float  # global gradient-norm clipping threshold
    lr_scheduler_type: str  # one of LR_SCHEDULERS
    warmup_ratio: float  # fraction of the step budget spent in linear warmup, in [0, 1)
    train_strategy: str  # a TRAIN_STRATEGIES name, or a reference id ("fsdp-full-shard", "fsdp-shard-grad-op")

    enable_gradient_checkpointing: bool = True  # non-reentrant activation checkpointing of LLM decoder layers
    enable_mixed_precision_training: bool = True  # bf16 autocast over FP32 master weights
    reduce_in_full_precision: bool = True  # reduce gradients in FP32 (else bf16)
    checkpoint_vision_blocks: bool = False  # also activation-checkpoint the ViT blocks
    policy: PolicyConfig = field(default_factory=default_policy)  # the policy family (--vla.policy.type) and options
    lr_decay_steps: int | None = None  # step-decay: the lr drops x0.1 after this many steps (OFT: 100k)
    adam_betas: tuple[float, float] = ADAMW_BETAS  # AdamW (beta1, beta2), each in [0, 1) (openpi: (0.9, 0.95))
    adam_eps: float = ADAMW_EPS  # AdamW epsilon, > 0
    warmup_steps: int | None = None  # warmup-steps+cosine-to-min: linear warmup 0 -> learning_rate over N steps
    min_learning_rate: float | None = None  # warmup-steps+cosine-to-min: the lr the cosine reaches at the last step
    ema_decay: float | None = None  # EMA of the trainable weights (openpi: 0.99), in (0, 1); None: no EMA
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters instead of full fine-tuning

    def __post_init__(self) -> None:
        # draccus writes a Path as a string and reads a `str | Path` back as str: store str so configs round-trip.
        if isinstance(self.base_vlm, Path):
            self.base_vlm = str(self.base_vlm)

    def stage(self) -> str:
        """The freezing stage the three flags select (`vla-full-train`, `vla-train`, `vla-sandwich-train`, ...)."""
        from vla_train.models.freezing import stage_from_flags  # lazy: the model stack imports transformers

        return stage_from_flags(self.freeze_vision_backbone, self.freeze_llm_backbone, self.unfreeze_last_llm_layer)

    def normalized_train_strategy(self, num_nodes: int = 1) -> str:
        """`train_strategy` as it runs on `num_nodes` nodes (`fsdp-full-shard` -> `full-shard` on one node,
        `hybrid-shard` on several; see `resolve_train_strategy`)."""
        return resolve_train_strategy(self.train_strategy, num_nodes)

    def grad_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per gradient step: `global_batch_size / (per_device_batch_size * world_size)`."""
        if world_size < 1 or self.per_device_batch_size < 1:
            raise ValueError(f"world_size ({world_size}) and per_device_batch_size ({self.per_device_batch_size}) "
                             "must be positive.")
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size < 1 or self.global_batch_size % per_step != 0:
            raise ValueError(
                f"global_batch_size = {self.global_batch_size} is not a positive multiple of per_device_batch_size * "
                f"world_size = {self.per_device_batch_size} * {world_size} = {per_step} (global batch = per-device "
                f"batch * world size * gradient-accumulation steps). Fix: pass --vla.global_batch_size as a multiple "
                f"of {per_step}, or a --vla.per_device_batch_size that makes it one."
            )
        return self.global_batch_size // per_step

    def check_world_size(self, world_size: int) -> None:
        """`expected_world_size` must equal the number of processes actually launched."""
        if self.expected_world_size != world_size:
            raise ValueError(
                f"Expected World Size = {self.expected_world_size} but Found {world_size} GPUs (processes) for "
                f"--vla.type {self.vla_id}. Fix: pick another --vla.type laid out for {world_size}, or pass "
                f"--vla.expected_world_size {world_size} (and check the batch sizes)."
            )

    def validate(self, world_size: int) -> None:
        """Raise a `ValueError` naming the bad value and the fix; call before any work."""
        self.check_world_size(world_size)
        for name in ("shuffle_buffer_size", "epochs", "global_batch_size", "per_device_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be positive. Fix: pass --vla.{name} >= 1.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps = {self.max_steps} must be positive. Fix: pass --vla.max_steps >= 1 or null.")
        for name, allow_zero in (("learning_rate", False), ("weight_decay", True), ("max_grad_norm", False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
                raise ValueError(f"{name} = {value} must be a finite {'non-negative' if allow_zero else 'positive'} "
                                 f"number. Fix: pass --vla.{name} with such a value.")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(f"Unknown lr_scheduler_type {self.lr_scheduler_type!r}. Fix: pass "
                             f"--vla.lr_scheduler_type one of {list(LR_SCHEDULERS)}.")
        if self.lr_scheduler_type == "step-decay" and (self.lr_decay_steps is None or self.lr_decay_steps < 1):
            raise ValueError(f"lr_scheduler_type step-decay needs lr_decay_steps >= 1, got {self.lr_decay_steps}. "
                             "Fix: pass --vla.lr_decay_steps (OpenVLA-OFT: 100000).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio = {self.warmup_ratio} is outside [0, 1). Fix: pass --vla.warmup_ratio "
                             "in [0, 1).")
        self.validate_adamw()
        self.validate_warmup_steps_schedule()
        if self.ema_decay is not None and not (math.isfinite(self.ema_decay) and 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"ema_decay = {self.ema_decay} is outside (0, 1). Fix: pass --vla.ema_decay in (0, 1) "
                             "(openpi: 0.99), or null for no EMA.")
        self.normalized_train_strategy()
        self.grad_accumulation_steps(world_size)
        self.stage()
        self.policy.validate()
        self.lora.validate()

    def validate_adamw(self) -> None:
        """`adam_betas`: two finite numbers in [0, 1); `adam_eps`: a finite number > 0."""
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas = {betas} must be two numbers in [0, 1). Fix: pass --vla.adam_betas "
                             f"'[0.9, 0.95]' (default {list(ADAMW_BETAS)}).")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"adam_eps = {self.adam_eps} must be a finite positive number. Fix: pass "
                             f"--vla.adam_eps > 0 (default {ADAMW_EPS:g}).")

    def validate_warmup_steps_schedule(self) -> None:
        """`warmup-steps+cosine-to-min` needs `0 <= warmup_steps < max_steps` (when set; else checked against the
        step budget when the schedule is built) and `0 <= min_learning_rate <= learning_rate`; the two options
        belong to that schedule only."""
        given = [f"--vla.{name}" for name in ("warmup_steps", "min_learning_rate") if getattr(self, name) is not None]
        if self.lr_scheduler_type != "warmup-steps+cosine-to-min":
            if given:
                raise ValueError(f"{' and '.join(given)} only apply to --vla.lr_scheduler_type warmup-steps+cosine-"
                                 f"to-min (this run: {self.lr_scheduler_type}). Fix: drop them, or pass that type.")
            return
        if self.warmup_ratio:
            raise ValueError(f"warmup_ratio = {self.warmup_ratio} does not apply to warmup-steps+cosine-to-min, whose "
                             "warmup is --vla.warmup_steps. Fix: pass --vla.warmup_ratio 0.")
        if self.warmup_steps is None or self.min_learning_rate is None:
            raise ValueError("lr_scheduler_type warmup-steps+cosine-to-min needs warmup_steps and min_learning_rate. "
                             "Fix: pass --vla.warmup_steps N and --vla.min_learning_rate LR (openpi: 1000, 2.5e-6).")
        budget = self.max_steps if self.max_steps is not None else math.inf
        if not 0 <= self.warmup_steps < budget:
            raise ValueError(f"warmup_steps = {self.warmup_steps} is outside [0, max_steps = {self.max_steps}). Fix: "
                             "pass --vla.warmup_steps >= 0 and below the step budget.")
        if not (math.isfinite(self.min_learning_rate) and 0.0 <= self.min_learning_rate <= self.learning_rate):
            raise ValueError(f"min_learning_rate = {self.min_learning_rate} is outside [0, learning_rate = "
                             f"{self.learning_rate}]. Fix: pass --vla.min_learning_rate in that range.")


# === The reference's 11 entries (facts §2.2) ===


@VLAConfig.register_subclass("siglip-224px+mx-bridge")
@dataclass
class Exp_SigLIP_224px_Bridge(VLAConfig):
    """Base of the reference entries: SigLIP + Vicuna 7B, fully trained on BridgeData V2 with 8 GPUs."""

    vla_id: str = "siglip-224px+mx-bridge"
    base_vlm: str | Path = "siglip-224px+7b"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "bridge"
    shuffle_buffer_size: int = 256_000
    epochs: int = 1000
    max_steps: int | None = None
    expected_world_size: int = 8
    global_batch_size: int = 256
    per_device_batch_size: int = 32
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    train_strategy: str = "fsdp-full-shard"


@VLAConfig.register_subclass("prism-dinosiglip-224px+mx-bridge")
@dataclass
class Exp_DinoSigLIP_224px_Bridge(Exp_SigLIP_224px_Bridge):
    vla_id: str = "prism-dinosiglip-224px+mx-bridge"
    base_vlm: str | Path = "prism-dinosiglip-224px+7b"


@VLAConfig.register_subclass("siglip-224px-icy+mx-bridge")
@dataclass
class Exp_FreezeVIT_SigLIP_224px_Bridge(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px-icy+mx-bridge"
    freeze_vision_backbone: bool = True


@VLAConfig.register_subclass("siglip-224px+mx-oxe-magic-soup")
@dataclass
class Exp_SigLIP_224px_OXE_Magic_Soup(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px+mx-oxe-magic-soup"
    data_mix: str = "oxe_magic_soup"
    expected_world_size: int = 64
    global_batch_size: int = 2048


@VLAConfig.register_subclass("prism-dinosiglip-224px+mx-oxe-magic-soup-plus")
@dataclass
class Exp_DinoSigLIP_224px_OXE_Magic_Soup_Plus(Exp_SigLIP_224px_Bridge):
    """OpenVLA 7B (the default). Trained on `oxe_magic_soup_plus` for ~70%, then on the mixture without DROID."""

    vla_id: str = "prism-dinosiglip-224px+mx-oxe-magic-soup-plus"
    base_vlm: str | Path = "prism-dinosiglip-224px+7b"
    data_mix: str = "oxe_magic_soup_plus_minus"
    expected_world_size: int = 64
    global_batch_size: int = 2048


@VLAConfig.register_subclass("siglip-224px+mx-tdroid_carrot_in_bowl")
@dataclass
class Exp_SigLIP_224px_TDROID_CarrotInBowl(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px+mx-tdroid_carrot_in_bowl"
    data_mix: str = "tdroid_carrot_in_bowl"


@VLAConfig.register_subclass("siglip-224px+mx-tdroid_pour_corn_in_pot")
@dataclass
class Exp_SigLIP_224px_TDROID_PourCornInPot(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px+mx-tdroid_pour_corn_in_pot"
    data_mix: str = "tdroid_pour_corn_in_pot"


@VLAConfig.register_subclass("siglip-224px-icy+mx-tdroid_carrot_in_bowl")
@dataclass
class Exp_SigLIP_224px_Icy_TDROID_CarrotInBowl(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px-icy+mx-tdroid_carrot_in_bowl"
    freeze_vision_backbone: bool = True
    data_mix: str = "tdroid_carrot_in_bowl"


@VLAConfig.register_subclass("siglip-224px-last_layer+mx-tdroid_carrot_in_bowl")
@dataclass
class Exp_SigLIP_224px_LastLayer_TDROID_CarrotInBowl(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px-last_layer+mx-tdroid_carrot_in_bowl"
    freeze_vision_backbone: bool = True
    freeze_llm_backbone: bool = True
    unfreeze_last_llm_layer: bool = True
    data_mix: str = "tdroid_carrot_in_bowl"


@VLAConfig.register_subclass("siglip-224px-sandwich+mx-tdroid_carrot_in_bowl")
@dataclass
class Exp_SigLIP_224px_Sandwich_TDROID_CarrotInBowl(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px-sandwich+mx-tdroid_carrot_in_bowl"
    freeze_llm_backbone: bool = True
    unfreeze_last_llm_layer: bool = True
    data_mix: str = "tdroid_carrot_in_bowl"


@VLAConfig.register_subclass("siglip-224px+mx-droid_wipe")
@dataclass
class Exp_SigLIP_224px_Droid_Wipe(Exp_SigLIP_224px_Bridge):
    vla_id: str = "siglip-224px+mx-droid_wipe"
    data_mix: str = "droid_wipe"


# === Tiny entries (2 processes) ===


@VLAConfig.register_subclass("tiny-demo")
@dataclass
class TinyDemo(VLAConfig):
    """The demo: trains the base-VLM run directory the demo writes on the synthetic `demo` mixture."""

    vla_id: str = "tiny-demo"
    base_vlm: str | Path = "runs/base-vlms/tiny-dinosiglip+tiny-llama"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "demo"
    shuffle_buffer_size: int = 2000
    epochs: int = 1000
    max_steps: int | None = 300
    expected_world_size: int = 2
    global_batch_size: int = 16
    per_device_batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear-warmup+cosine-decay"
    warmup_ratio: float = 0.05
    train_strategy: str = "full-shard"


@VLAConfig.register_subclass("tiny-test")
@dataclass
class TinyTest(VLAConfig):
    """Tests: builds `tiny-dinosiglip+tiny-llama` from seeded weights; 6 steps of 2 examples per rank on 2 ranks."""

    vla_id: str = "tiny-test"
    base_vlm: str | Path = "tiny-dinosiglip+tiny-llama"
    freeze_vision_backbone: bool = False
    freeze_llm_backbone: bool = False
    unfreeze_last_llm_layer: bool = False
    data_mix: str = "demo"
    shuffle_buffer_size: int = 64
    epochs: int = 1000
    max_steps: int | None = 6
    expected_world_size: int = 2
    global_batch_size: int = 4
    per_device_batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    train_strategy: str = "full-shard"


DEFAULT_VLA_ID = "prism-dinosiglip-224px+mx-oxe-magic-soup-plus"


def get_vla_config(vla_id: str) -> VLAConfig:
    """An instance of the registered VLAConfig `vla_id`."""
    known = sorted(VLAConfig.get_known_choices())
    if vla_id not in known:
        raise ValueError(f"Unknown vla id {vla_id!r}; registered: {known}.")
    return VLAConfig.get_choice_class(vla_id)()


# registers the OpenVLA-OFT and MetaWorld recipes
from vla_train.config import pi0, vla_adapter, vla_oft, vla_sim  # noqa: E402, F401
