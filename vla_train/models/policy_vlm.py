"""`PolicyVLM`: a PrismaticVLM plus the seeded modules a policy family adds (OFT's heads, VLA-Adapter's queries and
Bridge blocks, π0's action expert and projections).

The new modules are built from a fixed seed (`HEAD_INIT_SEED`) so that every rank and every reload starts
identically; `added_state` rebuilds the same values on the CPU for a rank that built the model on the meta device and
for a base checkpoint that lacks them. Shapes: H chunk length, A action dim, Q proprio dim.
"""

from typing import Any

import torch
from torch import nn

from vla_train.models.llm import LLMBackbone
from vla_train.models.vision import VisionBackbone
from vla_train.models.vlm import PrismaticVLM

HEAD_INIT_SEED = 17  # the new modules' init seed: identical weights on every rank


class PolicyVLM(PrismaticVLM):
    """A PrismaticVLM plus the seeded modules of a policy family (`new_module_keys`, built by `_new_modules`).

    A subclass sets its own attributes after `super().__init__`, then calls `self._add_new_modules()`."""

    new_module_keys: tuple[str, ...] = ()  # attribute names of the modules the family adds (None when absent)

    def __init__(self, model_id: str, vision_backbone: VisionBackbone, llm_backbone: LLMBackbone, *, action_dim: int,
                 chunk_length: int, proprio_dim: int | None = None, arch_specifier: str = "gelu-mlp",
                 enable_mixed_precision_training: bool = True, init_seed: int = HEAD_INIT_SEED) -> None:
        super().__init__(model_id, vision_backbone, llm_backbone, arch_specifier, enable_mixed_precision_training)
        self.action_dim, self.chunk_length, self.proprio_dim, self.init_seed = (action_dim, chunk_length,
                                                                                proprio_dim, init_seed)

    # --- the family's new modules -------------------------------------------------------------------------------
    def _new_modules(self) -> dict[str, nn.Module]:
        """The modules the family adds, built in a fixed order on the current default device (the caller seeds)."""
        raise NotImplementedError

    def _seeded_extras(self) -> None:
        """Changes to the adopted backbones drawn from the same seeded stream, after the new modules (OFT's FiLM)."""

    def _extra_added_state(self) -> dict[str, torch.Tensor]:
        """`added_state` of `_seeded_extras`, drawn in the same order (called right after the new modules)."""
        return {}

    def _add_new_modules(self) -> None:
        """Build `_new_modules` (then `_seeded_extras`) under `init_seed` and register them as trainable modules."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            for key, module in self._new_modules().items():
                setattr(self, key, module)
            self._seeded_extras()
        for key in self.new_module_keys:
            if not hasattr(self, key):
                setattr(self, key, None)
        new_keys = self.present_new_module_keys
        self.all_module_keys += new_keys
        self.trainable_module_keys += new_keys

    @property
    def present_new_module_keys(self) -> list[str]:
        """The family's module keys this model has (proprio off: no `proprio_projector`)."""
        return [key for key in self.new_module_keys if isinstance(getattr(self, key, None), nn.Module)]

    def added_state(self) -> dict[str, torch.Tensor]:
        """The initial values (full state-dict keys, CPU, FP32) of everything a base VLM checkpoint lacks, exactly as
        `__init__` on the CPU seeds them (a rank that builds on the meta device fills them from here)."""
        state = super().added_state()  # LoRA adapters
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(self.init_seed)
            state |= {f"{key}.{name}": tensor for key, module in self._new_modules().items()
                      for name, tensor in module.state_dict().items()}
            extra = self._extra_added_state()
        for key in self.state_dict(keep_vars=True):  # under the model's keys (an adapted Linear's `base_layer`)
            source = key if key in extra else self.base_checkpoint_key(key)
            if source in extra:
                state[key] = extra[source]
        return state

    def always_trainable(self) -> list[nn.Parameter]:
        """The family's modules train in every stage."""
        return [p for key in self.present_new_module_keys for p in getattr(self, key).parameters()]

    def unused_parameters(self) -> list[nn.Parameter]:
        """The LM head (the heads read hidden states; no logits are computed), unless tied to the input embeddings."""
        llm = self.llm_backbone.llm
        used = {id(p) for p in llm.get_input_embeddings().parameters()}
        return [p for p in llm.get_output_embeddings().parameters() if id(p) not in used]

    @classmethod
    def from_vlm(cls, vlm: PrismaticVLM, **kwargs: Any) -> "PolicyVLM":
        """Adopt a built VLM's backbones and projector (same parameters and keys) and add the family's modules
        (`kwargs`: `__init__`'s keyword arguments). An OpenVLA's `norm_stats` / `action_tokenizer` are carried over."""
        model = cls(vlm.model_id, vlm.vision_backbone, vlm.llm_backbone, arch_specifier=vlm.arch_specifier,
                    enable_mixed_precision_training=vlm.enable_mixed_precision_training, **kwargs)
        model.projector = vlm.projector
        model.vision_backbone_requires_grad = vlm.vision_backbone_requires_grad
        new_keys = [key for key in model.all_module_keys if key not in vlm.all_module_keys]
        model.trainable_module_keys = [*vlm.trainable_module_keys, *new_keys]
        for name in ("norm_stats", "action_tokenizer"):
            if hasattr(vlm, name):
                setattr(model, name, getattr(vlm, name))
        return model
