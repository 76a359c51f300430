"""Configuration of an exported OpenVLA / Prismatic model (Hugging Face remote code, `trust_remote_code=True`).

This file is copied into every exported directory and imports only `transformers`. Field names and meanings follow
the reference `OpenVLAConfig` (vision/LLM backbone ids, `arch_specifier`, `use_fused_vision_backbone`,
`timm_model_ids`, `timm_override_act_layers`, `image_sizes`, `image_resize_strategy`, `hf_llm_id`, `llm_max_length`,
`pad_token_id`, `pad_to_multiple_of`, `output_projector_states`, `text_config`, `norm_stats`, `n_action_bins`), with
these differences:
- `text_config` is the LLM's real configuration (the reference wrote a default `LlamaConfig` and patched three
  fields), serialized in full, with the legacy `rope_theta` / `torch_dtype` keys kept for transformers 4.x readers;
- the backbone ids are not checked against a fixed list: the architecture is fully described by the timm ids,
  `timm_model_kwargs` (extra `timm.create_model` arguments, e.g. for small test backbones) and `text_config`;
- `action_vocab_end` (end, exclusive, of the ids the 256 action bins occupy), `prompt_suffix_ids` (the ids that follow
  the right-stripped prompt at training time, e.g. `[29871]` for Llama-2), `vla_prompt_template` and `model_id` are
  written by the exporter. Configs without them (the released `openvla-7b`) fall back to the reference's values.
"""

import json
from typing import Any

from transformers import AutoConfig, PretrainedConfig

try:  # transformers 4.x and 5.x both export CONFIG_MAPPING from the auto package
    from transformers.models.auto import CONFIG_MAPPING
except ImportError:  # pragma: no cover - very old layouts
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def _text_config(text_config: Any) -> PretrainedConfig:
    """A `PretrainedConfig` from a config object, a serialized dict (`model_type` picks the class) or None."""
    if isinstance(text_config, PretrainedConfig):
        return text_config
    if text_config is None:  # the reference's behaviour: the default config of the LLM family
        return CONFIG_MAPPING["llama"]()
    values = dict(text_config)
    model_type = values.pop("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"text_config.model_type={model_type!r} is not a transformers model type.")
    return CONFIG_MAPPING[model_type](**values)


class PrismaticConfig(PretrainedConfig):
    """A Prismatic VLM: one or two timm ViT featurizers, a projector, and a causal LM described by `text_config`."""

    model_type = "prismatic"
    sub_configs = {"text_config": AutoConfig}  # noqa: RUF012  (transformers reads it as a class attribute)

    def __init__(
        self,
        vision_backbone_id: str = "siglip-vit-so400m",
        llm_backbone_id: str = "vicuna-v15-7b",
        arch_specifier: str = "no-align+gelu-mlp",
        use_fused_vision_backbone: bool | None = None,
        image_resize_strategy: str = "letterbox",
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        hf_llm_id: str | None = None,
        llm_max_length: int = 2048,
        pad_token_id: int = 32000,
        pad_to_multiple_of: int = 64,
        output_projector_states: bool = False,
        timm_model_ids: list[str] | None = None,
        timm_override_act_layers: list[str | None] | None = None,
        timm_model_kwargs: list[dict[str, Any]] | None = None,
        image_sizes: list[int] | None = None,
        model_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"image_resize_strategy={image_resize_strategy!r}; expected one of {RESIZE_STRATEGIES}.")
        self.vision_backbone_id, self.llm_backbone_id = vision_backbone_id, llm_backbone_id
        self.arch_specifier, self.image_resize_strategy = arch_specifier, image_resize_strategy
        if use_fused_vision_backbone is None:
            use_fused_vision_backbone = vision_backbone_id.startswith(("dinoclip", "dinosiglip"))
        self.use_fused_vision_backbone = bool(use_fused_vision_backbone)
        self.timm_model_ids = list(timm_model_ids or [])
        count = len(self.timm_model_ids)
        self.timm_override_act_layers = list(timm_override_act_layers or [None] * count)
        self.timm_model_kwargs = [dict(k) for k in (timm_model_kwargs or [{}] * count)]
        self.image_sizes = list(image_sizes or [])
        self.hf_llm_id, self.llm_max_length, self.model_id = hf_llm_id, llm_max_length, model_id
        self.pad_to_multiple_of, self.output_projector_states = pad_to_multiple_of, output_projector_states
        self.text_config = _text_config(text_config)
        # The top level ties exactly what the LLM ties: transformers 4.x's `tie_weights` reads the top-level flag
        # (default True there) and would otherwise tie an untied Llama head to its embeddings.
        kwargs["tie_word_embeddings"] = bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        """Like `to_dict` minus defaults, but `text_config` is always written in full (readers rebuild it as is)."""
        output = super().to_diff_dict()
        output["text_config"] = self.to_dict()["text_config"]
        output["text_config"].pop("transformers_version", None)
        return output

    def to_json_string(self, use_diff: bool = True) -> str:
        """The JSON transformers writes, plus the legacy keys transformers 4.x reads: `torch_dtype` (top level and
        `text_config`) and `text_config.rope_theta` (5.x writes `dtype` and `rope_parameters` instead)."""
        content = json.loads(super().to_json_string(use_diff=use_diff))
        for section in (content, content.get("text_config")):
            if isinstance(section, dict) and section.get("dtype") is not None:
                section.setdefault("torch_dtype", section["dtype"])
        text = content.get("text_config")
        rope = text.get("rope_parameters") if isinstance(text, dict) else None
        if isinstance(rope, dict) and "rope_theta" in rope:
            text.setdefault("rope_theta", rope["rope_theta"])
        return json.dumps(content, indent=2, sort_keys=True) + "\n"


class OpenVLAConfig(PrismaticConfig):
    """A Prismatic VLM that predicts actions: adds dataset statistics and the action-token layout.

    `norm_stats`: `{dataset: {"action": {"q01": [A], "q99": [A], "mask": [A], ...}}}` (dataset_statistics.json);
    `vla_prompt_template`: the right-stripped prompt with an `{instruction}` field (training lower-cased it), e.g.
    `"In: What action should the robot take to {instruction}?\nOut:"`.
    """

    model_type = "openvla"

    def __init__(
        self,
        norm_stats: dict[str, dict[str, Any]] | None = None,
        n_action_bins: int = 256,
        action_vocab_end: int | None = None,
        prompt_suffix_ids: list[int] | None = None,
        vla_prompt_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.norm_stats, self.n_action_bins = norm_stats, n_action_bins
        self.action_vocab_end = action_vocab_end
        self.prompt_suffix_ids = None if prompt_suffix_ids is None else [int(i) for i in prompt_suffix_ids]
        self.vla_prompt_template = vla_prompt_template
        super().__init__(**kwargs)
