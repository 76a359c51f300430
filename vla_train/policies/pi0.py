"""π0's policy hooks (`--vla.policy.type pi0`): the chunk policies' data needs and metrics with MEAN_STD
normalization, π0's processor (`pi0_processor.py`), the flow-matching forward through `Pi0VLM` and its loss weight
(valid chunk elements), and the token counts of its prefix and suffix."""

from typing import Any

from torch import nn

from vla_train.policies.base import Batch, PolicyOutput, TokenCounts
from vla_train.policies.chunk_policy import BaseChunkPolicy
from vla_train.policies.pi0_processor import Pi0BatchTransform

PI0_NORMALIZATION = "normal"  # MEAN_STD for actions and state (openpi's π0 default)


class Pi0Policy(BaseChunkPolicy):
    """π0 on the chunk-policy base: its config has `chunk_length`, `action_dim`, `proprio_dim`, `cameras`,
    `max_token_len`."""

    def pipeline_overrides(self) -> dict[str, Any]:
        return {**super().pipeline_overrides(), "normalization": PI0_NORMALIZATION}

    def batch_transform(self, model: nn.Module) -> Pi0BatchTransform:
        return Pi0BatchTransform(model.llm_backbone.get_tokenizer(), model.vision_backbone.get_image_transform(),
                                 self.needs, max_token_len=self.config.max_token_len)

    def forward(self, model: nn.Module, inputs: Batch, normalizer: float | None) -> PolicyOutput:
        output = model(pixel_values=inputs["pixel_values"], image_mask=inputs["image_mask"],
                       input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       proprio=inputs.get("proprio"), actions=inputs["actions"], action_mask=inputs["action_mask"],
                       normalizer=normalizer)
        return PolicyOutput(loss=output.loss, loss_weight=output.count, output=output)

    def loss_weight(self, batch: Batch) -> float:
        """Valid chunk elements: valid steps * A."""
        return float(batch["action_mask"].sum()) * self.config.action_dim

    def token_counts(self, model: nn.Module, inputs: Batch) -> TokenCounts:
        """Positions = prefix (patches of every camera + instruction tokens) + suffix (state + H action tokens);
        supervised = the H action tokens."""
        text_lengths = inputs["attention_mask"].sum(dim=1)
        batch, chunk = inputs["actions"].shape[:2]
        extra = len(self.config.cameras) * model.num_patches + 1 + chunk
        return TokenCounts(samples=batch, positions=text_lengths.sum() + batch * extra, supervised=batch * chunk,
                           text_lengths=text_lengths)
