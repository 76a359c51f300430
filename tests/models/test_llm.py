import inspect
import warnings

import pytest
import torch

from vla_train.models.llm import (
    LLM_BACKBONES,
    LLM_FAMILIES,
    LLMBackbone,
    architecture_dict,
    build_llm_config,
    get_llm_backbone_spec,
    output_cache,
    padded_vocab_rows,
    shrink_architecture,
)
from vla_train.models.tokenizers import build_tiny_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

# family -> (registry entry to shrink, tokenizer style, tokenizer has pad, vocab rows, expected decoder layer class)
FAMILY_CASES = {
    "llama": ("llama2-7b-pure", "llama", False, 512, "LlamaDecoderLayer"),
    "mistral": ("mistral-v0.1-7b-instruct", "llama", False, 512, "MistralDecoderLayer"),
    "phi": ("phi-2-3b", "qwen", False, 512, "PhiDecoderLayer"),
    "qwen2": ("qwen25-0_5b-pure", "qwen", True, 576, "Qwen2DecoderLayer"),  # rows > len(tokenizer), as Qwen2.5
}


def _write_hf_dir(path, spec, style, keep_pad, dtype=torch.bfloat16):
    """A local Hugging Face directory like a downloaded hub snapshot (weights saved in bf16)."""
    family = LLM_FAMILIES[spec.family]
    model = family.model_cls(family.config_cls(**spec.architecture)).to(dtype)
    tokenizer = build_tiny_tokenizer(style)
    if not keep_pad:
        tokenizer.pad_token = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_each_family_builds_from_config_and_from_local_hf_dir(family, tmp_path):
    backbone_id, style, has_pad, vocab_rows, layer_cls = FAMILY_CASES[family]
    spec = shrink_architecture(get_llm_backbone_spec(backbone_id), **{**SMALL, "vocab_size": vocab_rows})
    saved = _write_hf_dir(tmp_path, spec, style, keep_pad=has_pad)

    from_dir = LLMBackbone.from_pretrained_dir(spec, tmp_path, llm_max_length=128)
    assert all(p.dtype == torch.float32 for p in from_dir.parameters())
    assert from_dir.transformer_layer_cls.__name__ == layer_cls
    tokenizer = from_dir.get_tokenizer()
    assert tokenizer.model_max_length == 128 and tokenizer.padding_side == "right"
    rows = from_dir.llm.get_input_embeddings().weight.shape[0]
    if has_pad:  # the tokenizer's own pad token is kept and nothing is resized
        assert tokenizer.pad_token == "<|endoftext|>" and rows == vocab_rows
    else:
        assert tokenizer.pad_token == spec.pad_token and tokenizer.pad_token_id == len(tokenizer) - 1
        assert rows == 576  # 513 (or 516) tokens -> the next multiple of 64
    assert from_dir.llm.config.pad_token_id == tokenizer.pad_token_id
    saved_embed = saved.get_input_embeddings().weight.float()
    torch.testing.assert_close(from_dir.llm.get_input_embeddings().weight[:vocab_rows], saved_embed, rtol=0, atol=0)

    from_config = LLMBackbone.from_config(spec, llm_max_length=128, tokenizer=build_tiny_tokenizer(style))
    assert type(from_config.llm) is type(from_dir.llm)
    assert from_config.llm.config.use_cache is False  # training mode
    embed, last, head = from_config.last_layer_finetune_modules
    assert embed is from_config.llm.model.embed_tokens and head is from_config.llm.lm_head
    assert last is from_config.llm.model.layers[-1]


def test_missing_hf_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        LLMBackbone.from_pretrained_dir("tiny-llama", tmp_path / "nowhere")


# id -> (embedding rows after pad handling, layers, decoder layer class)
FULL_SIZE = {
    "llama2-7b-pure": (32064, 32, "LlamaDecoderLayer"),
    "llama2-13b-chat": (32064, 40, "LlamaDecoderLayer"),
    "vicuna-v15-7b": (32064, 32, "LlamaDecoderLayer"),
    "mistral-v0.1-7b-pure": (32064, 32, "MistralDecoderLayer"),
    "phi-2-3b": (51200, 32, "PhiDecoderLayer"),
    "qwen25-0_5b-pure": (151936, 24, "Qwen2DecoderLayer"),
    "qwen25-0_5b-extra": (151936, 24, "Qwen2DecoderLayer"),
    "qwen25-7b-pure": (152064, 28, "Qwen2DecoderLayer"),
}


@pytest.mark.parametrize("backbone_id", sorted(FULL_SIZE))
def test_full_size_backbones_build_on_meta(backbone_id):
    rows, layers, layer_cls = FULL_SIZE[backbone_id]
    with torch.device("meta"):
        backbone = LLMBackbone.from_config(backbone_id)
    assert backbone.llm.get_input_embeddings().weight.shape[0] == rows
    assert backbone.llm.get_output_embeddings().weight.shape[0] == rows
    assert len(backbone.llm.model.layers) == layers
    assert backbone.transformer_layer_cls.__name__ == layer_cls
    if backbone_id.startswith(("llama2", "vicuna", "mistral")):
        assert backbone.llm.config.pad_token_id == 32000


def test_tiny_backbones_have_project_tokenizers():
    llama = LLMBackbone.from_config("tiny-llama")
    assert llama.get_tokenizer().pad_token == "<PAD>" and llama.action_vocab_end == 512
    assert llama.llm.get_input_embeddings().weight.shape[0] == 576
    qwen = LLMBackbone.from_config("tiny-qwen25")
    assert qwen.get_tokenizer().pad_token == "<|endoftext|>"
    assert qwen.llm.lm_head.weight is qwen.llm.model.embed_tokens.weight  # tied, as Qwen2.5-0.5B


def test_extra_tokens_carry_the_action_bins():
    spec = shrink_architecture(get_llm_backbone_spec("qwen25-0_5b-extra"), **{**SMALL, "vocab_size": 1024})
    backbone = LLMBackbone.from_config(spec, tokenizer=build_tiny_tokenizer("qwen"))
    tokenizer = backbone.get_tokenizer()
    assert len(tokenizer) == 515 + 256
    assert backbone.action_vocab_end == len(tokenizer)
    assert tokenizer.convert_ids_to_tokens(backbone.action_vocab_end - 256) == "<|extra_0|>"


def test_padded_vocab_rows_never_shrinks():
    assert padded_vocab_rows(32000, 32001) == 32064
    assert padded_vocab_rows(51200, 50296) == 51200
    assert padded_vocab_rows(151936, 151665) == 151936


def test_unknown_backbone_and_missing_tokenizer_errors():
    with pytest.raises(ValueError, match="Unknown LLM backbone 'gpt-5'"):
        get_llm_backbone_spec("gpt-5")
    with torch.device("meta"):
        backbone = LLMBackbone.from_config("llama2-7b-pure")
    with pytest.raises(ValueError, match="meta-llama/Llama-2-7b-hf"):
        backbone.get_tokenizer()


def test_registry_has_every_named_family():
    families = {spec.family for spec in LLM_BACKBONES.values()}
    assert families == {"llama", "mistral", "phi", "qwen2", "gemma"}
    prompts = {spec.prompt_builder for spec in LLM_BACKBONES.values()}
    assert prompts == {"pure", "vicuna-v15", "llama2-chat", "mistral-instruct", "phi", "qwen25-chat"}


def test_paligemmas_gemma_builds_with_the_tiny_gemma_tokenizer():
    backbone = LLMBackbone.from_config("tiny-gemma")
    tokenizer = backbone.get_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, len(tokenizer)) == (0, 1, 2, 512)
    assert tokenizer("hi").input_ids[0] == 2  # BOS prepended, as PaliGemma's tokenizer does
    llm = backbone.llm
    assert llm.config.tie_word_embeddings and llm.lm_head.weight is llm.model.embed_tokens.weight
    ids = torch.tensor([[2, 40, 41]])
    torch.testing.assert_close(backbone.embed_input_ids(ids), llm.model.embed_tokens.weight[ids] * 48 ** 0.5)
    full = LLM_BACKBONES["gemma-2b"].architecture
    assert (full["hidden_size"], full["num_hidden_layers"], full["intermediate_size"], full["num_attention_heads"],
            full["num_key_value_heads"], full["head_dim"], full["vocab_size"]) == (2048, 18, 16384, 8, 1, 256, 257152)


# A tiny Llama outside the registry: other sizes and rms_norm_eps 1e-5 (the registry's tiny-llama has 1e-6).
OFF_REGISTRY_LLAMA = {**LLM_BACKBONES["tiny-llama"].architecture, "model_type": "llama", "hidden_size": 48,
                      "intermediate_size": 96, "num_hidden_layers": 3, "rms_norm_eps": 1e-5}


def test_llm_config_replaces_the_registry_architecture():
    backbone = LLMBackbone.from_config("tiny-llama", llm_config=OFF_REGISTRY_LLAMA)
    config = backbone.llm.config
    assert (config.hidden_size, config.num_hidden_layers, config.rms_norm_eps) == (48, 3, 1e-5)
    assert len(backbone.llm.model.layers) == 3 and backbone.embed_dim == 48
    assert backbone.llm.get_input_embeddings().weight.shape == (576, 48)  # still padded for the tokenizer's <PAD>
    assert backbone.get_tokenizer().pad_token == "<PAD>" and config.pad_token_id == 512
    assert LLMBackbone.from_config("tiny-llama").llm.config.rms_norm_eps == 1e-6  # the registry entry is untouched
    # Save/run-time keys are not architecture: an export's text_config builds the same LLM.
    exported = {**architecture_dict(config), "dtype": "bfloat16", "torch_dtype": "bfloat16", "use_cache": True,
                "transformers_version": "4.40.1", "architectures": ["LlamaForCausalLM"]}
    assert architecture_dict(build_llm_config(backbone.spec, exported)) == architecture_dict(config)


def test_llm_config_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"llm_config.model_type='qwen2' does not match llm_backbone_id='tiny-llama'"
                                         r".*Fix: pick a 'qwen2' backbone .*'tiny-qwen25'"):
        LLMBackbone.from_config("tiny-llama", llm_config={**OFF_REGISTRY_LLAMA, "model_type": "qwen2"})
    with pytest.raises(ValueError, match=r"(?s)llm_config is not a valid LlamaConfig .*not a multiple of the number of "
                                         r"attention heads"):
        LLMBackbone.from_config("tiny-llama", llm_config={**OFF_REGISTRY_LLAMA, "num_attention_heads": 5})
    spec = shrink_architecture(get_llm_backbone_spec("tiny-llama"), **SMALL)
    _write_hf_dir(tmp_path, spec, "llama", keep_pad=False)
    with pytest.raises(ValueError, match=r"not the model's llm_config architecture .*hidden_size: 48 vs 32"):
        LLMBackbone.from_pretrained_dir(spec, tmp_path, llm_config=OFF_REGISTRY_LLAMA)
    matching = architecture_dict(LLMBackbone.from_pretrained_dir(spec, tmp_path).llm.config)
    assert LLMBackbone.from_pretrained_dir(spec, tmp_path, llm_config=matching).llm.config.hidden_size == 32


def test_the_kv_cache_goes_in_under_the_installed_name(rgb_image):
    """transformers 5.24 renamed `past_key_values` to `cache`; the old name warns (and goes away in 5.40)."""
    backbone = LLMBackbone.from_config("tiny-llama", inference_mode=True)
    assert backbone.cache_argument in inspect.signature(backbone.llm.forward).parameters
    ids = torch.tensor([[1, 5, 9, 13]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        first = backbone(input_ids=ids, use_cache=True)
        step = backbone(input_ids=ids[:, -1:], past_key_values=output_cache(first), use_cache=True)
    full = backbone(input_ids=torch.cat([ids, ids[:, -1:]], dim=1)).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
