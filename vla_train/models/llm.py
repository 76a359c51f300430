"""LLM backbones: Hugging Face causal LMs (Llama-2, Vicuna, Mistral, Phi-2, Qwen2.5, PaliGemma's Gemma) with their
tokenizers.

Each registry entry carries the published architecture, so a backbone builds from its config alone (random weights,
or on the meta device for size checks), or from a local Hugging Face directory (weights loaded in FP32). Pad
handling follows the reference: a tokenizer without a pad token gets one (`<PAD>` for Llama/Mistral, `<|pad|>` for
Phi), and the embeddings grow to a multiple of 64 rows when the tokenizer outgrows them (32000 -> 32064 for Llama-2;
embeddings are never shrunk, unlike the reference's unconditional resize).
"""

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import ModelOutput
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.phi.modeling_phi import PhiDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from vla_train.models.prompts import PromptBuilder, get_prompt_builder_class
from vla_train.models.tokenizers import build_tiny_tokenizer

PAD_TO_MULTIPLE_OF = 64
IGNORE_INDEX = -100  # label of positions without loss (Hugging Face's ignore_index)
# Keys of a serialized Hugging Face config that describe how it was saved or is run, not the architecture.
NON_ARCHITECTURE_KEYS = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype",
                         "use_cache", "_attn_implementation", "attn_implementation")
# The KV cache is `past_key_values` up to transformers 5.23 and `cache` from 5.24 (forward arguments and outputs).
CACHE_NAMES = ("cache", "past_key_values")


@dataclass(frozen=True)
class LLMFamily:
    """The transformers classes of one architecture family."""

    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    decoder_layer_cls: type[nn.Module]


LLM_FAMILIES: dict[str, LLMFamily] = {
    "llama": LLMFamily(LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer),
    "mistral": LLMFamily(MistralConfig, MistralForCausalLM, MistralDecoderLayer),
    "phi": LLMFamily(PhiConfig, PhiForCausalLM, PhiDecoderLayer),
    "qwen2": LLMFamily(Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer),
    "gemma": LLMFamily(GemmaConfig, GemmaForCausalLM, GemmaDecoderLayer),
}


@dataclass(frozen=True)
class LLMBackboneSpec:
    """A registry entry. `tokenizer_len` is `len(tokenizer)` of the released tokenizer before pad/extra tokens."""

    backbone_id: str
    family: str
    hf_hub_path: str | None
    architecture: dict[str, Any]
    prompt_builder: str
    tokenizer_len: int
    pad_token: str | None = None  # added when the tokenizer has no pad token
    extra_tokens: int = 0  # MiniVLA "extra": add <|extra_i|> tokens and put the action bins on them
    tiny_tokenizer_style: str | None = None  # project-built tokenizer (tiny test/demo backbones)
    tokenizer_adds_bos: bool = True


_LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_LLAMA2_13B = {**_LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                   rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_PHI_2 = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4,
              layer_norm_eps=1e-5, hidden_act="gelu_new", rope_theta=10000.0, bos_token_id=50256, eos_token_id=50256,
              tie_word_embeddings=False)
_QWEN25_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643, tie_word_embeddings=True)
_QWEN25_1_5B = {**_QWEN25_0_5B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                "num_attention_heads": 12}
_QWEN25_3B = {**_QWEN25_0_5B, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
              "num_attention_heads": 16}
_QWEN25_7B = {**_QWEN25_0_5B, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
# PaliGemma's Gemma 2B (google/paligemma-3b-pt-224 `text_config`): multi-query attention, head dim 256, tied head.
_GEMMA_2B = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                 num_key_value_heads=1, head_dim=256, vocab_size=257152, max_position_embeddings=8192,
                 rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                 pad_token_id=0, tie_word_embeddings=True)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)


def _llama(backbone_id: str, hub: str, arch: dict, prompt: str) -> LLMBackboneSpec:
    return LLMBackboneSpec(backbone_id, "llama", hub, arch, prompt, tokenizer_len=32000, pad_token="<PAD>")


def _qwen(backbone_id: str, hub: str, arch: dict, extra: int = 0) -> LLMBackboneSpec:
    return LLMBackboneSpec(backbone_id, "qwen2", hub, arch, "qwen25-chat", tokenizer_len=151665, extra_tokens=extra,
                           tokenizer_adds_bos=False)


LLM_BACKBONES: dict[str, LLMBackboneSpec] = {
    spec.backbone_id: spec
    for spec in [
        _llama("llama2-7b-pure", "meta-llama/Llama-2-7b-hf", _LLAMA2_7B, "pure"),
        _llama("llama2-13b-pure", "meta-llama/Llama-2-13b-hf", _LLAMA2_13B, "pure"),
        _llama("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", _LLAMA2_7B, "llama2-chat"),
        _llama("llama2-13b-chat", "meta-llama/Llama-2-13b-chat-hf", _LLAMA2_13B, "llama2-chat"),
        _llama("vicuna-v15-7b", "lmsys/vicuna-7b-v1.5", _LLAMA2_7B, "vicuna-v15"),
        _llama("vicuna-v15-13b", "lmsys/vicuna-13b-v1.5", _LLAMA2_13B, "vicuna-v15"),
        LLMBackboneSpec("mistral-v0.1-7b-pure", "mistral", "mistralai/Mistral-7B-v0.1", _MISTRAL_7B, "pure",
                        tokenizer_len=32000, pad_token="<PAD>"),
        LLMBackboneSpec("mistral-v0.1-7b-instruct", "mistral", "mistralai/Mistral-7B-Instruct-v0.1", _MISTRAL_7B,
                        "mistral-instruct", tokenizer_len=32000, pad_token="<PAD>"),
        LLMBackboneSpec("phi-2-3b", "phi", "microsoft/phi-2", _PHI_2, "phi", tokenizer_len=50295,
                        pad_token="<|pad|>", tokenizer_adds_bos=False),
        _qwen("qwen25-0_5b-pure", "Qwen/Qwen2.5-0.5B", _QWEN25_0_5B),
        _qwen("qwen25-0_5b-extra", "Qwen/Qwen2.5-0.5B", _QWEN25_0_5B, extra=256),
        _qwen("qwen25-1_5b-pure", "Qwen/Qwen2.5-1.5B", _QWEN25_1_5B),
        _qwen("qwen25-3b-pure", "Qwen/Qwen2.5-3B", _QWEN25_3B),
        _qwen("qwen25-7b-pure", "Qwen/Qwen2.5-7B", _QWEN25_7B),
        LLMBackboneSpec("gemma-2b", "gemma", "google/paligemma-3b-pt-224", _GEMMA_2B, "pure", tokenizer_len=257152),
        # Tiny backbones for tests and the demo, with tokenizers this project builds.
        LLMBackboneSpec("tiny-llama", "llama", None, {**_TINY, "vocab_size": 512, "bos_token_id": 1,
                        "eos_token_id": 2, "tie_word_embeddings": False}, "pure", tokenizer_len=512,
                        pad_token="<PAD>", tiny_tokenizer_style="llama"),
        LLMBackboneSpec("tiny-qwen25", "qwen2", None, {**_TINY, "vocab_size": 576, "bos_token_id": 512,
                        "eos_token_id": 512, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}, "qwen25-chat",
                        tokenizer_len=515, tiny_tokenizer_style="qwen", tokenizer_adds_bos=False),
        LLMBackboneSpec("tiny-gemma", "gemma", None, {**_GEMMA_2B, "hidden_size": 48, "intermediate_size": 96,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 512},
                        "pure", tokenizer_len=512, tiny_tokenizer_style="gemma"),
    ]
}


def get_llm_backbone_spec(backbone_id: "str | LLMBackboneSpec") -> LLMBackboneSpec:
    """Registry lookup; a spec passes through (tests use shrunken copies of registry entries)."""
    if isinstance(backbone_id, LLMBackboneSpec):
        return backbone_id
    if backbone_id not in LLM_BACKBONES:
        raise ValueError(f"Unknown LLM backbone {backbone_id!r}; registered: {sorted(LLM_BACKBONES)}.")
    return LLM_BACKBONES[backbone_id]


def architecture_dict(config: PretrainedConfig | dict[str, Any]) -> dict[str, Any]:
    """A config's architecture as plain JSON values (`to_dict()` minus `NON_ARCHITECTURE_KEYS`; JSON turns e.g.
    `id2label`'s int keys into strings), so that it compares equal after a trip through a `config.json`."""
    values = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in NON_ARCHITECTURE_KEYS}))


def build_llm_config(spec: LLMBackboneSpec, llm_config: dict[str, Any] | None = None,
                     name: str = "llm_config") -> PretrainedConfig:
    """The transformers config of a backbone: `llm_config` (a Hugging Face config dict, e.g. an export's
    `text_config`; `name` in errors) when given, else the registry architecture. It must be of the backbone's family.
    """
    family = LLM_FAMILIES[spec.family]
    if llm_config is None:
        return family.config_cls(**spec.architecture)
    values = {k: v for k, v in llm_config.items() if k not in NON_ARCHITECTURE_KEYS}
    model_type = values.pop("model_type", spec.family)
    if model_type != spec.family:
        same_family = sorted(b for b, s in LLM_BACKBONES.items() if s.family == model_type)
        raise ValueError(f"{name}.model_type={model_type!r} does not match llm_backbone_id={spec.backbone_id!r}, "
                         f"a {spec.family!r} backbone. Fix: pick a {model_type!r} backbone for its tokenizer and "
                         f"prompt format ({same_family or 'none is registered'}), or a {spec.family!r} {name}.")
    try:
        return family.config_cls(**values)
    except Exception as error:  # transformers 5 validates with huggingface_hub's StrictDataclassError, not ValueError
        raise ValueError(f"{name} is not a valid {family.config_cls.__name__} ({error}). Fix: pass the "
                         "model's Hugging Face config.json content (an export's text_config).") from error


def architecture_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """`"key: expected vs actual"` for every key of `expected` (JSON values) whose value `actual` does not have."""
    return [f"{key}: {value!r} vs {actual[key]!r}" if key in actual else f"{key}: {value!r} vs absent"
            for key, value in sorted(expected.items()) if key not in actual or actual[key] != value]


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache (`cache` from transformers 5.24, else
    `past_key_values`), so callers pass it without a deprecated keyword."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), "past_key_values")


def output_cache(output: Any) -> Any:
    """The KV cache of a transformers model output, whichever name the installed version gives it (None if none)."""
    fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output)
    return next((getattr(output, name) for name in CACHE_NAMES if name in fields), None)


@dataclass
class SupervisedCausalLMOutput(ModelOutput):
    """Training output with the LM head applied only where a label is supervised (N positions in all).

    `logits [N, V]` are those of the hidden states at `(rows, positions)` (row-major order), each predicting the next
    token `labels [N]` (the shifted label, never -100); `loss` is Hugging Face's causal-LM loss on them (mean, or sum
    / `num_items_in_batch`). `positions` index the sequence the LLM saw (`T + P` for a VLM); `rows` the caller's
    batch rows (the VLM maps them back to its input order).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def padded_vocab_rows(current_rows: int, tokenizer_len: int) -> int:
    """Rows the embedding needs: grow to a multiple of 64 when the tokenizer outgrows it; never shrink."""
    needed = -(-tokenizer_len // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return max(current_rows, needed) if tokenizer_len > current_rows else current_rows


def prepare_tokenizer(spec: LLMBackboneSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the pad token and MiniVLA extra tokens a backbone expects (in place); right padding."""
    if tokenizer.pad_token is None:
        if spec.pad_token is None:
            raise ValueError(f"Tokenizer of {spec.backbone_id!r} has no pad token and the registry names none.")
        tokenizer.add_special_tokens({"pad_token": spec.pad_token})
    if spec.extra_tokens and f"<|extra_{spec.extra_tokens - 1}|>" not in tokenizer.get_vocab():
        added = tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(spec.extra_tokens)])
        if added != spec.extra_tokens:
            raise ValueError(f"Added {added} of {spec.extra_tokens} extra tokens to the {spec.backbone_id} tokenizer.")
    tokenizer.padding_side = "right"
    return tokenizer


def find_local_tokenizer(spec: LLMBackboneSpec, llm_max_length: int) -> PreTrainedTokenizerBase | None:
    """The backbone's tokenizer: built by the project for tiny backbones, else from the local HF cache (or None)."""
    if spec.tiny_tokenizer_style is not None:
        return build_tiny_tokenizer(spec.tiny_tokenizer_style, model_max_length=llm_max_length)
    try:
        return AutoTokenizer.from_pretrained(spec.hf_hub_path, model_max_length=llm_max_length, local_files_only=True)
    except OSError:
        return None


class LLMBackbone(nn.Module):
    """A causal LM (`self.llm`) plus its tokenizer, prompt format and FSDP / freezing metadata."""

    def __init__(self, spec: LLMBackboneSpec, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                 llm_max_length: int = 2048, inference_mode: bool = False) -> None:
        super().__init__()
        self.spec, self.identifier, self.llm_max_length = spec, spec.backbone_id, llm_max_length
        self.llm, self.tokenizer = llm, tokenizer
        self.cache_argument = cache_argument(llm)
        if tokenizer is not None:
            prepare_tokenizer(spec, tokenizer)
            self.llm.config.pad_token_id = tokenizer.pad_token_id
            tokenizer_len = len(tokenizer)
        else:  # built without its tokenizer (size checks): the pad token would be appended to the vocabulary
            self.llm.config.pad_token_id = spec.tokenizer_len if spec.pad_token else self.llm.config.pad_token_id
            tokenizer_len = spec.tokenizer_len + (1 if spec.pad_token else 0) + spec.extra_tokens
        rows = self.llm.get_input_embeddings().weight.shape[0]
        if padded_vocab_rows(rows, tokenizer_len) != rows:
            self.llm.resize_token_embeddings(padded_vocab_rows(rows, tokenizer_len), mean_resizing=False)
        self.llm.config.use_cache = inference_mode
        if not inference_mode:
            # Gradients reach the (possibly frozen) input embeddings' outputs, as checkpointed layers need.
            self.llm.enable_input_require_grads()

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, backbone_id: str | LLMBackboneSpec, llm_max_length: int = 2048, inference_mode: bool = False,
                    tokenizer: PreTrainedTokenizerBase | None = None, attn_implementation: str = "sdpa",
                    llm_config: dict[str, Any] | None = None) -> "LLMBackbone":
        """Random weights (FP32) of the registry architecture, or of `llm_config` (a Hugging Face config dict of the
        backbone's family, see `build_llm_config`); works under `torch.device("meta")`."""
        spec = get_llm_backbone_spec(backbone_id)
        config = build_llm_config(spec, llm_config)
        config._attn_implementation = attn_implementation
        llm = LLM_FAMILIES[spec.family].model_cls(config).to(torch.float32)
        tokenizer = tokenizer if tokenizer is not None else find_local_tokenizer(spec, llm_max_length)
        return cls(spec, llm, tokenizer, llm_max_length, inference_mode)

    @classmethod
    def from_pretrained_dir(cls, backbone_id: str | LLMBackboneSpec, path: str | Path, llm_max_length: int = 2048,
                            inference_mode: bool = False, attn_implementation: str = "sdpa",
                            llm_config: dict[str, Any] | None = None) -> "LLMBackbone":
        """Weights, config and tokenizer from a local Hugging Face directory, weights in FP32. A given `llm_config`
        must describe the directory's architecture (checked on the keys it sets)."""
        spec, path = get_llm_backbone_spec(backbone_id), Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"No Hugging Face model at {path} (missing {path / 'config.json'}).")
        family = LLM_FAMILIES[spec.family]
        llm = family.model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=llm_max_length)
        backbone = cls(spec, llm, tokenizer, llm_max_length, inference_mode)
        if llm_config is not None:  # compared after the pad token and embedding padding, as from_config builds it
            expected = architecture_dict(build_llm_config(spec, llm_config))
            differences = architecture_differences(expected, architecture_dict(backbone.llm.config))
            if differences:
                raise ValueError(f"The LLM in {path} is not the model's llm_config architecture (llm_config vs "
                                 f"directory: {'; '.join(differences[:8])}). Fix: pass the Hugging Face directory "
                                 "of this model's LLM, or no llm_hf_dir.")
        return backbone

    # --- metadata -----------------------------------------------------------------------------------------------
    @property
    def prompt_builder_fn(self) -> type[PromptBuilder]:
        return get_prompt_builder_class(self.spec.prompt_builder)

    @property
    def transformer_layer_cls(self) -> type[nn.Module]:
        """The decoder-layer class: the FSDP wrap and activation-checkpointing unit."""
        return LLM_FAMILIES[self.spec.family].decoder_layer_cls

    @property
    def transformer_layers(self) -> nn.ModuleList:
        """The decoder layers, in forward order."""
        return self.llm.model.layers

    def activation_checkpoint_containers(self) -> list[nn.Module]:
        """Containers whose items are the activation-checkpointing units (wrapped in place, same state-dict keys)."""
        return [self.transformer_layers]

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP units in forward order: each decoder layer (embeddings, final norm and head stay with the root).
        Call after activation checkpointing, which replaces the layers by their wrappers."""
        return list(self.transformer_layers)

    @property
    def last_layer_finetune_modules(self) -> tuple[nn.Module, ...]:
        """Input embeddings, final decoder layer and output head (the final norm stays frozen)."""
        return (self.llm.model.embed_tokens, self.transformer_layers[-1], self.llm.lm_head)

    @property
    def embed_dim(self) -> int:
        return self.llm.config.hidden_size

    @property
    def action_vocab_end(self) -> int:
        """End (exclusive) of the id block the action bins use: the base vocabulary, or the MiniVLA extra tokens."""
        if self.tokenizer is None:
            raise ValueError(f"LLM backbone {self.identifier!r} was built without a tokenizer.")
        if self.spec.extra_tokens:
            return self.tokenizer.convert_tokens_to_ids(f"<|extra_{self.spec.extra_tokens - 1}|>") + 1
        return self.tokenizer.vocab_size

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError(f"LLM backbone {self.identifier!r} has no tokenizer: pass a local Hugging Face directory "
                             f"holding {self.spec.hf_hub_path!r} (see README, 'Base VLMs').")
        return self.tokenizer

    def init_nonpersistent_buffers(self) -> None:
        """Recompute in place, on their device, the buffers no state dict holds (the rotary embedding's `inv_freq`
        and `original_inv_freq`): after a meta-device build and `to_empty` they hold garbage. Every module owning
        such buffers goes through the Hugging Face model's own initializer (`_init_weights`, which transformers runs
        after its own meta-device loading); the loader checks that no such buffer is left unset."""
        for module in self.llm.modules():
            if module._non_persistent_buffers_set:
                self.llm._init_weights(module)

    def embed_input_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def forward(self, past_key_values: Any = None, **kwargs: Any) -> Any:
        """The causal LM's forward; the KV cache goes in under the name the installed transformers uses.

        Training (module in train mode, `labels` given, no cache) returns a `SupervisedCausalLMOutput`: logits only
        at supervised positions. Otherwise (eval, generation, no labels) the model's full output, logits `[B, L, V]`.
        """
        if past_key_values is not None:
            kwargs[self.cache_argument] = past_key_values
        elif self.training and kwargs.get("labels") is not None and not kwargs.get("use_cache"):
            return self.supervised_forward(**kwargs)
        return self.llm(**kwargs)

    def supervised_forward(self, labels: torch.Tensor, num_items_in_batch: Any = None,
                           **kwargs: Any) -> SupervisedCausalLMOutput:
        """Decoder to hidden states `[B, L, d]`, then the LM head only at the N positions t with `labels[:, t + 1]`
        != -100: logits `[N, V]` instead of `[B, L, V]`. Same loss as the full forward (`ForCausalLMLoss`: float32
        logits, mean over supervised tokens, or sum / `num_items_in_batch`), gradients equal up to summation order."""
        kwargs.pop("use_cache", None)
        # On a GPU, nonzero waits for the device; it is placed next to the decoder's own wait (its attention-mask
        # check), where the queue is short.
        rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        hidden = self.llm.model(use_cache=False, **kwargs).last_hidden_state  # [B, L, d]
        targets = labels[rows, positions + 1]  # [N]
        logits = self.llm.lm_head(hidden[rows, positions])  # [N, V]
        loss = self.llm.loss_function(logits=logits, labels=None, vocab_size=self.llm.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch, shift_labels=targets)
        return SupervisedCausalLMOutput(loss=loss, logits=logits, labels=targets, rows=rows, positions=positions)


def shrink_architecture(spec: LLMBackboneSpec, **overrides: Any) -> LLMBackboneSpec:
    """A copy of `spec` with a smaller architecture (tests build each family small)."""
    return dataclasses.replace(spec, architecture={**spec.architecture, **overrides})
