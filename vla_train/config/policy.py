"""PolicyConfig: which policy family a VLA run trains, and that family's options (`--vla.policy.type <family>`).

A draccus `ChoiceRegistry`, one subclass per family, holding only options (no torch import here: configs load
without the model stack). `PolicyConfig.build()` returns the family's `Policy` (`vla_train/policies/`), the
object the trainer, evaluation, checkpoints and export call for everything family-specific
(shared/design/policies.md). A run directory written before policies existed has no `policy` entry in its
config.json and reads back as `openvla`, the default.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import draccus

if TYPE_CHECKING:
    from vla_train.policies.base import Policy


@dataclass
class PolicyConfig(draccus.ChoiceRegistry):
    """A policy family's options; `build()` gives its implementation."""

    def build(self) -> "Policy":
        raise NotImplementedError(f"{type(self).__name__} registers no Policy implementation.")

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


def default_policy() -> PolicyConfig:
    return OpenVLAPolicyConfig()
