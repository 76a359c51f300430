"""PolicyConfig: which policy family a VLA run trains, and that family's options (`--vla.policy.type <family>`).

A draccus `ChoiceRegistry`, one subclass per family, holding only options (no torch import here: configs load
without the model stack). `PolicyConfig.build()` returns the family's `Policy` (`vla_train/policies/`), the
object the trainer, evaluation, checkpoints and export call for everything family-specific
(shared/design/policies.md). A run directory written before policies existed has no `policy` entry in its
config.json and reads back as `openvla`, the default.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import draccus

if TYPE_CHECKING:
    from torch import nn

    from vla_train.policies.base import Policy


@dataclass
class PolicyConfig(draccus.ChoiceRegistry):
    """A policy family's options; `build()` gives its implementation."""

    def build(self) -> "Policy":
        raise NotImplementedError(f"{type(self).__name__} registers no Policy implementation.")

    def build_model(self, vlm: "nn.Module") -> "nn.Module":
        """The family's model around a built base VLM (same device: meta for training, CPU to load a run): the VLM
        itself by default. Called wherever a run's model is built (training, resume, export, serving)."""
        return vlm

    def validate(self) -> None:
        """Raise a ValueError naming the bad option and the fix (called with the rest of the config)."""

    def camera_roles(self) -> list[str]:
        """The camera roles the policy reads, in order (one `primary` image by default)."""
        return ["primary"]

    @property
    def family(self) -> str:
        """The registry name (`--vla.policy.type`)."""
        return self.get_choice_name(type(self))


@PolicyConfig.register_subclass("openvla")
@dataclass
class OpenVLAPolicyConfig(PolicyConfig):
    """OpenVLA: one action of the current step as 256-bin tokens, decoded autoregressively (causal attention)."""

    predict_stop_token: bool = True  # supervise the stop token after the action tokens (the reference does)

    def build(self) -> "Policy":
        from vla_train.policies.openvla import OpenVLAPolicy  # lazy: the model stack imports transformers

        return OpenVLAPolicy(self)


def check_integer_options(config: PolicyConfig, **minimums: int) -> None:
    """Raise a ValueError naming the first option of `config` that is not an integer >= its minimum."""
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"--vla.policy.{name} = {value!r} must be an integer >= {minimum}.")


OFT_HEADS = ("l1", "diffusion")


@PolicyConfig.register_subclass("oft")
@dataclass
class OFTPolicyConfig(PolicyConfig):
    """OpenVLA-OFT: the whole action chunk `[H, A]` in one bidirectional forward, from a continuous head (L1
    regression or DDIM diffusion) reading the LLM's hidden states at H*A action slots; optional proprio token, several
    cameras, FiLM language conditioning of the ViT (`vla_train/models/oft/`)."""

    head: str = "l1"  # "l1" (MLPResNet regression, L1 loss) or "diffusion" (DDIM noise prediction, MSE loss)
    chunk_length: int = 8  # H: actions per chunk (OFT: 8 LIBERO, 25 ALOHA, 5 Bridge)
    action_dim: int = 7  # A: must equal the dataset's action dimension (OFT: 7 LIBERO, 14 ALOHA)
    proprio_dim: int = 8  # P: the dataset's proprio dimension (OFT: 8 LIBERO, 14 ALOHA); 0 = no proprio token
    cameras: list[str] = field(default_factory=lambda: ["primary", "wrist"])  # camera roles, 256 patches each
    film: bool = False  # FiLM: condition every ViT block on the mean language embedding (OFT's ALOHA recipe)
    num_diffusion_steps_inference: int = 50  # DDIM steps of `predict_action` (diffusion head)
    head_hidden_dim: int | None = None  # the L1 head's hidden width (default: the LLM's width, as OFT)

    def build(self) -> "Policy":
        from vla_train.policies.oft import OFTPolicy  # lazy: the model stack imports transformers

        return OFTPolicy(self)

    def build_model(self, vlm: "nn.Module") -> "nn.Module":
        from vla_train.models.oft.model import OFTVLM  # lazy, as build()

        return OFTVLM.from_vlm(vlm, action_dim=self.action_dim, chunk_length=self.chunk_length,
                               proprio_dim=self.proprio_dim or None, head=self.head,
                               head_hidden_dim=self.head_hidden_dim, film=self.film,
                               num_diffusion_steps_inference=self.num_diffusion_steps_inference)

    def camera_roles(self) -> list[str]:
        return list(self.cameras)

    def validate(self) -> None:
        if self.head not in OFT_HEADS:
            raise ValueError(f"--vla.policy.head {self.head!r} is not an OFT head; choose one of {list(OFT_HEADS)}.")
        check_integer_options(self, chunk_length=1, action_dim=1, proprio_dim=0, num_diffusion_steps_inference=1)
        if not 1 <= len(self.cameras) <= 3:
            raise ValueError(f"--vla.policy.cameras {self.cameras} must name 1 to 3 camera roles (OFT: primary + "
                             "wrist for LIBERO, primary + left_wrist + right_wrist for ALOHA).")


VLA_ADAPTER_BLOCKS = ("pro", "original")


@PolicyConfig.register_subclass("vla-adapter")
@dataclass
class VLAAdapterPolicyConfig(PolicyConfig):
    """VLA-Adapter: N learned ActionQuery tokens appended to the prompt; a Bridge-Attention policy (one block per LLM
    layer) reads every layer's raw features and ActionQuery states, plus a proprio token, and regresses the chunk
    `[H, A]` with an L1 loss (`vla_train/models/vla_adapter/`)."""

    chunk_length: int = 8  # H: actions per chunk (VLA-Adapter: 8 for LIBERO and CALVIN)
    action_dim: int = 7  # A: must equal the dataset's action dimension
    proprio_dim: int = 8  # P: the dataset's proprio dimension; 0 = no proprio token in the policy
    cameras: list[str] = field(default_factory=lambda: ["primary", "wrist"])  # camera roles, in input order
    num_action_queries: int = 64  # N: ActionQuery tokens (upstream: 64)
    block: str = "pro"  # "pro" (VLA-Adapter-Pro's Bridge block, RoPE, upstream default) or "original"
    num_heads: int = 8  # attention heads of each Bridge block (upstream: 8)
    # Inference feeds the policy the training distribution's query input (one seeded N(0, 0.02) draw) instead of
    # upstream's zeros, which the first LayerNorm maps to its bias, an input training never shows it.
    inference_query_noise: bool = False

    def build(self) -> "Policy":
        from vla_train.policies.vla_adapter import VLAAdapterPolicy  # lazy: the model stack imports transformers

        return VLAAdapterPolicy(self)

    def build_model(self, vlm: "nn.Module") -> "nn.Module":
        from vla_train.models.vla_adapter.model import VLAAdapterVLM  # lazy, as build()

        return VLAAdapterVLM.from_vlm(vlm, action_dim=self.action_dim, chunk_length=self.chunk_length,
                                      proprio_dim=self.proprio_dim or None, num_action_queries=self.num_action_queries,
                                      pro=self.block == "pro", num_heads=self.num_heads,
                                      inference_query_noise=self.inference_query_noise)

    def camera_roles(self) -> list[str]:
        return list(self.cameras)

    def validate(self) -> None:
        if self.block not in VLA_ADAPTER_BLOCKS:
            raise ValueError(f"--vla.policy.block {self.block!r}: choose one of {list(VLA_ADAPTER_BLOCKS)}.")
        check_integer_options(self, chunk_length=1, action_dim=1, proprio_dim=0, num_action_queries=1, num_heads=1)
        if not 1 <= len(self.cameras) <= 3:
            raise ValueError(f"--vla.policy.cameras {self.cameras} must name 1 to 3 camera roles (VLA-Adapter LIBERO: "
                             "primary + wrist).")


PI0_EXPERTS = ("gemma-300m", "tiny")  # the action expert's size (`models/pi0/model.py` EXPERT_SIZES)
PI0_MAX_DIM = 32  # π0 pads actions and state to 32 dimensions


@PolicyConfig.register_subclass("pi0")
@dataclass
class Pi0PolicyConfig(PolicyConfig):
    """π0: PaliGemma (SigLIP + Gemma 2B) reads the cameras and the instruction; a Gemma action expert sharing its
    attention denoises the chunk `[H, A]` by flow matching (10 Euler steps at inference); actions and state are
    MEAN_STD-normalized and padded to 32 dimensions (`vla_train/models/pi0/`)."""

    chunk_length: int = 50  # H: actions per chunk (openpi: 50)
    action_dim: int = 7  # A: must equal the dataset's action dimension (<= 32)
    proprio_dim: int = 8  # the dataset's state dimension (<= 32); 0 = a zero state
    cameras: list[str] = field(default_factory=lambda: ["primary", "wrist"])  # base_0_rgb, then wrist cameras
    max_token_len: int = 48  # instruction tokens (openpi: 48), truncated beyond
    expert: str = "gemma-300m"  # the action expert: "gemma-300m" (width 1024, MLP 4096) or "tiny" (tests)
    num_inference_steps: int = 10  # Euler steps of `predict_action`

    def build(self) -> "Policy":
        from vla_train.policies.pi0 import Pi0Policy  # lazy: the model stack imports transformers

        return Pi0Policy(self)

    def build_model(self, vlm: "nn.Module") -> "nn.Module":
        from vla_train.models.pi0.model import Pi0VLM  # lazy, as build()

        return Pi0VLM.from_vlm(vlm, action_dim=self.action_dim, chunk_length=self.chunk_length,
                               proprio_dim=self.proprio_dim or None, expert=self.expert,
                               num_cameras=len(self.cameras), max_token_len=self.max_token_len,
                               num_inference_steps=self.num_inference_steps)

    def camera_roles(self) -> list[str]:
        return list(self.cameras)

    def validate(self) -> None:
        if self.expert not in PI0_EXPERTS:
            raise ValueError(f"--vla.policy.expert {self.expert!r}: choose one of {list(PI0_EXPERTS)}.")
        check_integer_options(self, chunk_length=1, action_dim=1, proprio_dim=0, max_token_len=2,
                              num_inference_steps=1)
        for name in ("action_dim", "proprio_dim"):
            if getattr(self, name) > PI0_MAX_DIM:
                raise ValueError(f"--vla.policy.{name} = {getattr(self, name)}: π0 pads actions and state to "
                                 f"{PI0_MAX_DIM} dimensions, so at most {PI0_MAX_DIM}.")
        if not 1 <= len(self.cameras) <= 3:
            raise ValueError(f"--vla.policy.cameras {self.cameras} must name 1 to 3 camera roles (π0: base_0_rgb, "
                             "left_wrist_0_rgb, right_wrist_0_rgb).")


def policy_section(policy: PolicyConfig) -> dict[str, Any]:
    """The config.json `vla.policy` section of `policy`, as a training run writes it (with its registry `type`)."""
    return {"type": policy.family, **draccus.encode(policy)}


def default_policy() -> PolicyConfig:
    return OpenVLAPolicyConfig()


def read_policy_config(run_dir: str | Path) -> PolicyConfig:
    """The policy of a run directory's `config.json` (`vla.policy`); `openvla` when it records none (runs written
    before policies existed, imported OpenVLA directories)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a vla-train run directory.")
    section: Any = json.loads(path.read_text()).get("vla", {}).get("policy")
    if not section:
        return default_policy()
    return draccus.decode(PolicyConfig, section)
