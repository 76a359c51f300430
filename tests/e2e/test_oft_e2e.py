"""torchrun, 2 processes, gloo: OpenVLA-OFT policies (L1 and diffusion heads, with and without proprio, one and two
cameras, FiLM) train, record their policy, save loadable runs, reject mismatched data early and resume exactly."""

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.e2e.conftest import assert_ok, recipe_args, recipe_run_dir, step_losses, torchrun
from tests.export.test_oft_import import write_oft_release
from vla_train.config.train import load_train_config
from vla_train.export.hf_import import import_hf
from vla_train.export.oft_files import load_oft_step_files
from vla_train.models.oft.model import OFTVLM
from vla_train.models.run_dir import load_base_vlm, load_run_dir

BASE_VLM = "tiny-dinosiglip+tiny-llama"


oft_args, _run_dir = recipe_args, recipe_run_dir


def _changed(before: dict, after: dict, keys) -> list[str]:
    return [key for key in keys if not torch.equal(before[key].float(), after[key].float())]


CASES = [  # (recipe, extra flags, expected policy options)
    ("tiny-oft-l1", [], {"head": "l1", "proprio_dim": 9, "cameras": ["primary", "wrist"], "film": False}),
    ("tiny-oft-diffusion", ["--vla.policy.proprio_dim", "0", "--vla.policy.cameras", "[primary]"],
     {"head": "diffusion", "proprio_dim": 0, "cameras": ["primary"], "film": False}),
    ("tiny-oft-l1", ["--vla.policy.film", "true", "--vla.freeze_vision_backbone", "true"],
     {"head": "l1", "proprio_dim": 9, "cameras": ["primary", "wrist"], "film": True}),
]


@pytest.mark.parametrize(("vla_type", "flags", "expected"), CASES, ids=["l1-proprio-2cams", "diffusion-1cam",
                                                                        "l1-film-frozen-vit"])
def test_oft_policies_train_and_write_loadable_runs(vla_type, flags, expected, demo_data, tmp_path):
    result = torchrun(oft_args(demo_data, tmp_path, vla_type, "--vla.max_steps", "3", *flags))
    assert_ok(result)
    run_dir = _run_dir(tmp_path, vla_type)
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    policy = json.loads((run_dir / "config.json").read_text())["vla"]["policy"]
    assert policy["type"] == "oft" and {k: policy[k] for k in expected} == expected
    assert policy["chunk_length"] == 4 and load_train_config(run_dir).vla.policy.head == expected["head"]
    assert "Held-out L1 (normalized actions)" in result.stderr  # diffusion: sampled with its DDIM steps
    assert "mean-action baseline" in result.stderr

    model = load_run_dir(run_dir)  # the run's own policy model, from its consolidated checkpoint
    assert isinstance(model, OFTVLM) and model.has_film == expected["film"]
    assert (model.proprio_projector is not None) == (expected["proprio_dim"] > 0)
    initial = {**{model.base_checkpoint_key(k): v for k, v in model.added_state().items()},
               **load_base_vlm(BASE_VLM).state_dict()}
    trained = {model.base_checkpoint_key(k): v for k, v in model.state_dict().items()}
    heads = [k for k in trained if k.split(".")[0] in ("action_head", "proprio_projector", "noisy_action_projector")]
    assert heads and _changed(initial, trained, heads)  # the new modules started from added_state and trained
    film = [k for k in model.state_dict() if ".scale." in k or ".shift." in k]
    assert bool(film) == expected["film"]
    if expected["film"]:  # FiLM trains inside a frozen ViT; the ViT's own weights stay bit-identical
        vision = [model.base_checkpoint_key(k) for k in model.state_dict()
                  if k.startswith("vision_backbone.") and k not in film]
        assert not _changed(initial, trained, vision)
        trained_film = {k: v for k, v in model.state_dict().items()}
        added = model.added_state()
        assert [k for k in film if not torch.equal(added[k], trained_film[k])]


def test_mismatched_action_dim_fails_before_any_work(demo_data, tmp_path):
    result = torchrun(oft_args(demo_data, tmp_path, "tiny-oft-l1", "--vla.policy.action_dim", "6"))
    assert result.returncode != 0
    assert "Dataset 'demo_libero' has action dimension 7, but --vla.policy.action_dim = 6" in result.stderr
    assert not any(tmp_path.glob("tiny-oft-l1+*/checkpoints/step-*"))


def test_oft_lora_resume_reproduces_a_straight_run_exactly(demo_data, tmp_path):
    """An L1 + LoRA run (bf16 frozen base, fp32 adapters and heads) stopped and resumed equals the straight run
    step for step; its consolidated checkpoint is the merged model, and the base weights never moved."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--vla.max_steps", "6", "--vla.lr_decay_steps", "3", "--save_interval", "2", "--vla.lora.enabled",
              "true", "--vla.lora.rank", "4", "--vla.policy.film", "true"]
    first_run = torchrun(oft_args(demo_data, straight, "tiny-oft-l1", *common))
    assert_ok(first_run)
    assert "with LoRA r=4 (adapters only)" in first_run.stderr
    assert_ok(torchrun(oft_args(demo_data, split, "tiny-oft-l1", *common, "--stop_after_steps", "3")))
    resumed = torchrun(oft_args(demo_data, split, "tiny-oft-l1", *common, "--resume", "auto"))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr
    expected, got = step_losses(_run_dir(straight, "tiny-oft-l1")), step_losses(_run_dir(split, "tiny-oft-l1"))
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert got == expected  # bit-identical per-step losses across the step decay

    run_dir = _run_dir(straight, "tiny-oft-l1")
    saved = FileSystemReader(next(run_dir.glob("checkpoints/step-000006-*[0-9]"))).read_metadata()
    model_keys = {k: v for k, v in saved.state_dict_metadata.items() if k.startswith("model.")}
    adapters = [k for k in model_keys if ".lora_A." in k]
    assert adapters and all(model_keys[k.replace("lora_A.default", "base_layer")].properties.dtype == torch.bfloat16
                            for k in adapters)  # frozen base in bf16 beside the fp32 adapters
    assert all(model_keys[k].properties.dtype == torch.float32 for k in adapters)
    assert not [k for k in saved.state_dict_metadata if k.startswith("optimizer.state.") and ".base_layer." in k]
    merged = load_run_dir(run_dir)  # the consolidated .pt: plain keys, merged adapters
    base = load_base_vlm(BASE_VLM).state_dict()
    trained = {merged.base_checkpoint_key(k): v for k, v in merged.state_dict().items()}  # FiLM -> timm keys
    adapted = [merged.base_checkpoint_key(k.replace("lora_A.default.weight", "weight").removeprefix("model."))
               for k in adapters]
    assert all(key in trained for key in adapted) and _changed(base, trained, adapted)
    untouched = [k for k in base if k.startswith("llm_backbone.") and "norm" in k]
    assert untouched and not _changed(base, trained, untouched)  # not adapted, frozen: bit-identical
    _assert_oft_files_load(run_dir, merged)


def _assert_oft_files_load(run_dir, merged: OFTVLM) -> None:
    """The final checkpoint directory holds OFT's files; loaded into a fresh model they give the trained heads and
    (LoRA merged with lora_adapter/'s alpha / r) the trained FiLMed vision backbone."""
    (directory,) = [p for p in run_dir.glob("checkpoints/step-000006-*") if p.is_dir()]
    names = {p.name for p in directory.iterdir()}
    assert {"action_head--6_checkpoint.pt", "proprio_projector--6_checkpoint.pt", "vision_backbone--6_checkpoint.pt",
            "lora_adapter", "dataset_statistics.json"} <= names
    adapter = json.loads((directory / "lora_adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 16)
    vision_file = torch.load(directory / "vision_backbone--6_checkpoint.pt", weights_only=True)
    assert any(k.endswith(".base_layer.weight") for k in vision_file) and not any(k.startswith("vision") for k in
                                                                                  vision_file)
    fresh = load_train_config(run_dir).vla.policy.build_model(load_base_vlm(BASE_VLM, vla=True))
    assert load_oft_step_files(fresh, directory) == ["action_head", "proprio_projector", "vision_backbone"]
    expected = merged.state_dict()
    for key, value in fresh.state_dict().items():
        if key.split(".")[0] in ("action_head", "proprio_projector", "vision_backbone"):
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_fine_tunes_from_an_imported_oft_checkpoint_directory(demo_data, tmp_path):
    """OFT's release layout (HF backbone + per-step files, LoRA-wrapped FiLMed vision) -> import -> train.py."""
    hf_dir, _ = write_oft_release(tmp_path / "release", film=True, proprio_dim=9)
    checkpoint = import_hf(hf_dir, tmp_path / "imported", chunk_length=4, cameras=["primary", "wrist"])
    result = torchrun(oft_args(demo_data, tmp_path / "runs", "tiny-oft-l1", "--vla.max_steps", "2",
                               "--vla.policy.film", "true", "--pretrained_checkpoint", str(checkpoint),
                               "--is_resume", "false"))
    assert_ok(result)
    assert f"from {checkpoint}" in result.stderr  # the imported weights, heads and FiLM included, were streamed
    assert sorted(step_losses(_run_dir(tmp_path / "runs", "tiny-oft-l1"))) == [1, 2]
