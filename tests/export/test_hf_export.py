"""Export to a Hugging Face directory: the exported model, loaded with transformers alone (`trust_remote_code=True`),
predicts the training-time model's actions token for token; config, keys, processor and tokenizer are checked."""

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from tests.conftest import NORM_STATS
from vla_train.config.model import ModelConfig, get_model_config
from vla_train.export.compat import write_tiny_vla_run
from vla_train.export.hf import AUTO_MAP, TOKENIZER_LOAD_TIME_KEYS, build_image_processor, export_hf, save_processor
from vla_train.export.hf_remote import REMOTE_MODULES
from vla_train.export.hf_remote.configuration_prismatic import OpenVLAConfig
from vla_train.export.hf_remote.modeling_prismatic import OpenVLAForActionPrediction
from vla_train.export.hf_remote.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor
from vla_train.export.keys import MODULE_KEYS, native_to_hf
from vla_train.models.build import build_vlm
from vla_train.models.openvla import OpenVLA
from vla_train.models.run_dir import load_run_dir
from vla_train.models.vision import VisionBackbone
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

REPO = Path(__file__).resolve().parents[2]
PARITY_MODEL_IDS = ("tiny-dinosiglip+tiny-llama", "tiny-siglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25")
INSTRUCTIONS = ("pick up the cup", "Open the DRAWER", "wave", "put the red block on the blue plate")
TWO_DATASETS = {**NORM_STATS, "other": {"action": {"q01": [-1.0] * 7, "q99": [2.0] * 7}}}
# config.json of the released openvla/openvla-7b as the reference converter writes it (facts §10.2): a default
# LlamaConfig patched to 32064 rows, no field of this project; norm_stats shortened to one dataset.
RELEASED_OPENVLA_7B = {
    "model_type": "openvla", "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
    "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None], "image_sizes": [224, 224], "image_resize_strategy": "resize-naive",
    "hf_llm_id": "meta-llama/Llama-2-7b-hf", "llm_max_length": 2048, "pad_token_id": 32000, "pad_to_multiple_of": 64,
    "output_projector_states": False, "n_action_bins": 256, "torch_dtype": "bfloat16",
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "norm_stats": {"bridge_orig": NORM_STATS["demo_dataset"]}, "architectures": ["OpenVLAForActionPrediction"],
}


# --- helpers (also used by test_hf_import.py) ---------------------------------------------------------------------
def make_run_dir(model: str | ModelConfig, run_dir: Path, *, noise: float = 0.3, seed: int = 0,
                 norm_stats: dict | None = None) -> Path:
    """A VLA training run directory built without training (`vla_train.export.compat.write_tiny_vla_run`):
    `config.json`, statistics, and `checkpoints/{latest-checkpoint,step-000002-epoch-00-loss=1.2345}.pt` of a tiny
    OpenVLA whose weights carry seeded noise (so greedy actions differ between images and instructions)."""
    model_cfg = get_model_config(model) if isinstance(model, str) else model
    return write_tiny_vla_run(model_cfg, run_dir, noise=noise, seed=seed, norm_stats=norm_stats or NORM_STATS)


def sample_images() -> list[Image.Image]:
    """Seeded RGB images of several sizes and aspect ratios (the letterbox and resize paths differ on them)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            for h, w in [(48, 80), (64, 64), (90, 33), (224, 224)]]




def load_native(run_dir: Path) -> OpenVLA:
    stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    return load_run_dir(run_dir, vla=True, norm_stats=stats).eval()


def native_pixels_of(vision: VisionBackbone, image: Image.Image) -> torch.Tensor | dict[str, torch.Tensor]:
    """The training-time transform of one image, with a batch dimension."""
    pixels = vision.get_image_transform()(image)
    return {k: v[None] for k, v in pixels.items()} if isinstance(pixels, dict) else pixels[None]


def stacked(pixels: torch.Tensor | dict[str, torch.Tensor], keys: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([pixels[k] for k in keys], dim=1) if isinstance(pixels, dict) else pixels


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_MODEL_IDS)
def exported(request, tmp_path_factory):
    """(model_id, run_dir, hf_dir, native OpenVLA, exported model, processor)."""
    root = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    run_dir = make_run_dir(request.param, root / "run")
    hf_dir = export_hf(run_dir, root / "hf")
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
    return request.param, run_dir, hf_dir, load_native(run_dir), model, processor


def hf_inputs(model, processor, instruction: str, image: Image.Image):
    prompt = model.config.vla_prompt_template.format(instruction=instruction.lower())
    return processor(prompt, image)


# --- parity -------------------------------------------------------------------------------------------------------
def test_predict_action_equals_the_training_time_model(exported):
    model_id, _, _, native, model, processor = exported
    tokenizer = native.llm_backbone.get_tokenizer()
    keys, token_ids = native.vision_backbone.keys, set()
    for image in sample_images():
        for instruction in INSTRUCTIONS:
            inputs = hf_inputs(model, processor, instruction, image)
            ids, mask = model.append_prompt_suffix(inputs["input_ids"], inputs["attention_mask"])
            native_ids = torch.tensor([vla_prompt_prefix_ids(native.llm_backbone.prompt_builder_fn, tokenizer,
                                                             instruction)])
            assert torch.equal(ids, native_ids), (model_id, instruction)
            pixels = native_pixels_of(native.vision_backbone, image)
            assert torch.equal(inputs["pixel_values"], stacked(pixels, keys))  # the processor = training transform
            assert inputs["pixel_values"].dtype == torch.float32

            with torch.no_grad():
                native_logits = native(input_ids=native_ids, pixel_values=pixels).logits
                hf_logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
            torch.testing.assert_close(hf_logits, native_logits, rtol=1e-5, atol=1e-5)

            native_tokens = native.generate_action_token_ids(native_ids, pixels, 7)
            hf_tokens = model.generate_action_token_ids(ids, mask, inputs["pixel_values"], 7)
            assert torch.equal(hf_tokens, native_tokens), (model_id, instruction)
            token_ids.update(native_tokens.flatten().tolist())

            expected = native.predict_action(image, instruction)
            actual = model.predict_action(**inputs, do_sample=False)
            assert actual.shape == (7,) and actual.dtype == np.float64
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)
    assert len(token_ids) > 10, "the noise should make the greedy actions vary"


@pytest.mark.parametrize("strategy", ["resize-naive", "resize-crop", "letterbox"])
@pytest.mark.parametrize("backbone_id", ["clip-vit-b", "siglip-vit-b16-256px", "in1k-vit-l", "dinosiglip-vit-so-224px",
                                         "tiny-dinosiglip-vit"])
def test_image_processor_is_bit_identical_to_the_training_transform(backbone_id, strategy):
    """Every resize path (crop_pct 0.9 for CLIP, the SigLIP / IN1K no-crop fix, DINO, letterbox fills), without
    weights: the featurizers are built on the meta device."""
    with torch.device("meta"):
        vision = VisionBackbone(backbone_id, strategy)
    processor = build_image_processor(vision)
    reloaded = PrismaticImageProcessor.from_dict(processor.to_dict())
    for image in sample_images():
        expected = stacked(native_pixels_of(vision, image), vision.keys)[0]
        assert torch.equal(processor.apply_transform(image), expected), (backbone_id, strategy, image.size)
        assert torch.equal(reloaded(image, return_tensors="pt")["pixel_values"][0], expected)


def test_batched_predict_action_equals_one_by_one(exported):
    _, _, _, _, model, processor = exported
    instructions = ["pick up the cup", "pick up the pen", "pick up the box"]  # equal token lengths
    images = sample_images()[:3]
    prompts = [model.config.vla_prompt_template.format(instruction=i) for i in instructions]
    batch = processor(prompts, images)
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 3
    actions = model.predict_action(**batch, do_sample=False)
    assert actions.shape == (3, 7)
    for row, (instruction, image) in enumerate(zip(instructions, images, strict=True)):
        single = model.predict_action(**hf_inputs(model, processor, instruction, image))
        np.testing.assert_allclose(actions[row], single, rtol=0, atol=1e-12)


def test_prompt_suffix_is_appended_once_with_its_attention_mask(exported):
    _, _, _, _, model, processor = exported
    image = sample_images()[0]
    stripped = hf_inputs(model, processor, "wave", image)
    ids, mask = model.append_prompt_suffix(stripped["input_ids"], stripped["attention_mask"])
    suffix = model.config.prompt_suffix_ids
    assert suffix and ids[0, -len(suffix):].tolist() == suffix
    assert ids.shape == mask.shape and bool(mask.all())  # the reference left the mask one short (facts §12.35)
    again, again_mask = model.append_prompt_suffix(ids, mask)
    assert torch.equal(again, ids) and torch.equal(again_mask, mask)
    expected = model.predict_action(**stripped)
    assert np.array_equal(model.predict_action(input_ids=ids, attention_mask=mask,
                                               pixel_values=stripped["pixel_values"]), expected)

    mixed = torch.cat([stripped["input_ids"], ids[:, 1:]])
    with pytest.raises(ValueError, match="Some prompts end with the suffix"):
        model.append_prompt_suffix(mixed, None)
    padded = dict(stripped, attention_mask=torch.zeros_like(stripped["attention_mask"]))
    with pytest.raises(ValueError, match="unpadded prompts"):
        model.predict_action(**padded)
    with pytest.raises(ValueError, match="greedily"):
        model.predict_action(**stripped, do_sample=True)
    with pytest.raises(ValueError, match="unnorm_key='nope'"):
        model.predict_action(**stripped, unnorm_key="nope")


# --- files --------------------------------------------------------------------------------------------------------
def test_config_carries_statistics_real_text_config_and_auto_map(exported):
    model_id, run_dir, hf_dir, native, model, _ = exported
    config = json.loads((hf_dir / "config.json").read_text())
    llm_config = native.llm_backbone.llm.config
    assert config["model_type"] == "openvla" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["norm_stats"] == json.loads((run_dir / "dataset_statistics.json").read_text())
    assert (hf_dir / "dataset_statistics.json").read_text() == (run_dir / "dataset_statistics.json").read_text()
    assert config["n_action_bins"] == 256 and config["action_vocab_end"] == native.action_tokenizer.vocab_end
    text = config["text_config"]
    for field in ("rms_norm_eps", "num_hidden_layers", "hidden_size", "num_key_value_heads", "tie_word_embeddings"):
        assert text[field] == getattr(llm_config, field), field
    assert text["vocab_size"] == native.llm_backbone.llm.get_input_embeddings().weight.shape[0]
    assert text["pad_token_id"] == config["pad_token_id"] == native.llm_backbone.get_tokenizer().pad_token_id
    assert text["rope_theta"] == llm_config.rope_parameters["rope_theta"]  # for transformers 4.x readers
    assert config["auto_map"] == AUTO_MAP and {"AutoModelForImageTextToText", "AutoModelForVision2Seq"} <= set(AUTO_MAP)
    model_cfg = get_model_config(model_id)
    for field in ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy", "llm_max_length"):
        assert config[field] == getattr(model_cfg, field)
    assert config["use_fused_vision_backbone"] == native.vision_backbone.is_fused
    assert len(config["timm_model_ids"]) == len(config["image_sizes"]) == len(native.vision_backbone.keys)
    if model_id.endswith("llama"):
        assert config["prompt_suffix_ids"] == [native.llm_backbone.get_tokenizer().convert_tokens_to_ids("▁")]
        assert config["vla_prompt_template"] == "In: What action should the robot take to {instruction}?\nOut:"
    for name in REMOTE_MODULES:
        assert (hf_dir / name).is_file()
    loaded = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
    assert loaded.text_config.rms_norm_eps == llm_config.rms_norm_eps and loaded.norm_stats == config["norm_stats"]
    assert model.dtype == torch.float32


def test_weights_use_the_reference_key_layout(exported):
    _, _, hf_dir, native, _, _ = exported
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_tensor(key).dtype for key in keys}
    assert dtypes == {torch.float32}
    fused = native.vision_backbone.is_fused
    projector = {key.split(".")[1] for key in keys if key.startswith("projector.")}
    assert projector == ({"fc1", "fc2", "fc3"} if fused else {"fc1", "fc2"})
    assert any(key.startswith("vision_backbone.featurizer.blocks.0.") for key in keys)
    assert any(key.startswith("vision_backbone.fused_featurizer.") for key in keys) == fused
    assert not any("gamma" in key for key in keys)
    assert ("vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys) == fused  # DINO has LayerScale
    assert all(key.split(".")[0] in {"vision_backbone", "projector", "language_model"} for key in keys)
    assert "language_model.model.embed_tokens.weight" in keys
    native_count = sum(len(getattr(native, key).state_dict()) for key in ("vision_backbone", "projector",
                                                                              "llm_backbone"))
    tied = native.llm_backbone.llm.config.tie_word_embeddings
    assert len(keys) == native_count - (1 if tied else 0)  # a tied head is stored once


def test_tokenizer_round_trips_through_save_pretrained(exported):
    _, _, hf_dir, native, _, processor = exported
    original = native.llm_backbone.get_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    action_chars = original.decode(list(native.action_tokenizer.action_token_ids)[:20])
    for text in ["In: What action should the robot take to wave?\nOut:", "hello world", action_chars]:
        assert reloaded(text).input_ids == original(text).input_ids == processor.tokenizer(text).input_ids
    assert (reloaded.pad_token_id, reloaded.model_max_length) == (original.pad_token_id, original.model_max_length)
    assert reloaded.padding_side == "right"


def test_processor_never_returns_token_type_ids_and_predict_action_ignores_them(exported):
    """transformers 4.x's PreTrainedTokenizerFast adds token_type_ids unless told not to, and OpenVLA's README passes
    `**processor(prompt, image)` to predict_action: the processor drops them, and predict_action tolerates them."""
    _, _, hf_dir, _, model, processor = exported
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["model_input_names"] == [
        "input_ids", "attention_mask"]
    image = sample_images()[2]
    expected = model.predict_action(**hf_inputs(model, processor, "wave", image))
    processor.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as 4.x's default
    try:
        inputs = hf_inputs(model, processor, "wave", image)
    finally:
        processor.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    with_types = dict(inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))
    np.testing.assert_array_equal(model.predict_action(**with_types, do_sample=False), expected)


def test_tokenizer_config_carries_no_load_time_settings(exported, tmp_path):
    """A tokenizer loaded with `from_pretrained(..., local_files_only=True)` (how the full-size backbones find theirs)
    records that load in its init kwargs; the exported tokenizer_config.json must not carry it."""
    _, _, hf_dir, native, _, processor = exported
    native.llm_backbone.get_tokenizer().save_pretrained(tmp_path / "source")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "source", local_files_only=True)
    assert {"local_files_only", "is_local"} <= set(loaded.init_kwargs)  # what the export used to write
    save_processor(PrismaticProcessor(processor.image_processor, loaded), tmp_path / "export")
    for directory in (hf_dir, tmp_path / "export"):
        written = json.loads((directory / "tokenizer_config.json").read_text())
        assert not set(written) & set(TOKENIZER_LOAD_TIME_KEYS), sorted(written)
        assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert reloaded("pick up the cup").input_ids == loaded("pick up the cup").input_ids


def test_forward_takes_the_cache_by_either_name_and_returns_it_under_the_installed_one(exported):
    """transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (outputs and forward arguments)."""
    _, _, _, _, model, processor = exported
    inputs = hf_inputs(model, processor, "wave", sample_images()[0])
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        cache_name = "cache" if "cache" in first else "past_key_values"
        assert first[cache_name] is not None and first.projector_features is None
        step = {"input_ids": first.logits[:, -1:].argmax(dim=-1), "use_cache": True}
        by_old_name = model(**step, past_key_values=copy.deepcopy(first[cache_name])).logits
        by_new_name = model(**step, cache=copy.deepcopy(first[cache_name])).logits
        with pytest.raises(ValueError, match="not both"):
            model(**step, cache=first[cache_name], past_key_values=first[cache_name])
    assert torch.equal(by_old_name, by_new_name)


def test_remote_modules_import_only_allowed_packages():
    allowed = {"torch", "timm", "transformers", "numpy", "PIL", "json", "math", "types", "dataclasses", "typing",
               "inspect"}
    remote = REPO / "vla_train" / "export" / "hf_remote"
    for name in REMOTE_MODULES:
        tree = ast.parse((remote / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


def test_released_openvla_7b_config_builds_the_layout_our_7b_checkpoints_map_to():
    """Full size on the meta device: the remote model built from the released config has exactly the keys and shapes
    that a `prism-dinosiglip-224px+7b` checkpoint maps to (7,541,237,184 parameters), and the reference fallbacks."""
    config = OpenVLAConfig(**{k: v for k, v in RELEASED_OPENVLA_7B.items() if k != "model_type"})
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
        native = build_vlm(get_model_config("prism-dinosiglip-224px+7b"))
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    mapped = native_to_hf({key: getattr(native, key).state_dict() for key in MODULE_KEYS},
                          native.vision_backbone.keys)
    assert {key: tuple(tensor.shape) for key, tensor in mapped.items()} == shapes
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["vision_backbone.featurizer.blocks.23.ls2.scale_factor"] == (1024,)
    assert sum(p.numel() for p in model.parameters()) == 7_541_237_184
    assert model.prompt_suffix_ids == [29871] and model.action_vocab_end == 32000  # the reference's constants
    assert not config.tie_word_embeddings


# --- options and errors -------------------------------------------------------------------------------------------
def test_bf16_export_with_step_and_two_datasets(tmp_path):
    run_dir = make_run_dir("tiny-siglip+tiny-llama", tmp_path / "run", norm_stats=TWO_DATASETS)
    hf_dir = export_hf(run_dir, tmp_path / "hf", step=2, dtype="bf16")
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    inputs = hf_inputs(model, processor, "wave", sample_images()[0])
    with pytest.raises(ValueError, match="pass unnorm_key"):
        model.predict_action(**inputs)
    action = model.predict_action(**inputs, unnorm_key="other")
    assert action.shape == (7,) and np.all((action >= -1.0) & (action <= 2.0))


def test_export_errors_name_the_problem(tmp_path):
    run_dir = make_run_dir("tiny-siglip+tiny-llama", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 .*step-000002-epoch-00-loss=1.2345.pt"):
        export_hf(run_dir, tmp_path / "a", step=7)
    with pytest.raises(ValueError, match="Unknown dtype 'fp16'"):
        export_hf(run_dir, tmp_path / "b", dtype="fp16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite true"):
        export_hf(run_dir, tmp_path / "full")
    ckpt = run_dir / "checkpoints" / "latest-checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"]["projector"]["projector.9.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"unexpected keys \['projector.9.weight'\]"):
        export_hf(run_dir, tmp_path / "c")
    del state["model"]["vision_backbone"]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="lacks \\['model.vision_backbone'\\]"):
        export_hf(run_dir, tmp_path / "d")
    (run_dir / "dataset_statistics.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_statistics.json does not exist"):
        export_hf(run_dir, tmp_path / "e")


def test_export_script_writes_a_loadable_directory(tmp_path):
    run_dir = make_run_dir("tiny-dinosiglip+tiny-llama", tmp_path / "run")
    command = [sys.executable, "vla-scripts/export_hf.py", "--run_dir", str(run_dir), "--step", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hf_dir = run_dir / "hf-step-000002"
    assert "Exported" in result.stderr and (hf_dir / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
    image = sample_images()[1]
    expected = load_native(run_dir).predict_action(image, "wave")
    np.testing.assert_allclose(model.predict_action(**hf_inputs(model, processor, "wave", image)), expected, atol=0)
