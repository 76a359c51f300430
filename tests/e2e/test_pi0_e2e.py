"""torchrun, 2 processes, gloo: π0 (`tiny-pi0`: PaliGemma + a Gemma action expert whose layer i shares the FSDP2 and
activation-checkpointing unit of the VLM's layer i) trains by flow matching, resumes exactly, exports to LeRobot's
layout, imports back, predicts the same chunk (also through the action server), and fine-tunes from the import."""

import json

import json_numpy
import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e.conftest import assert_ok, recipe_args, recipe_run_dir, step_losses, torchrun
from vla_train.export.hf import export_hf
from vla_train.export.pi0_run import import_pi0_lerobot
from vla_train.export.server import create_app, load_run_dir_model
from vla_train.export.server_oft import Pi0ActionModel
from vla_train.models.pi0.model import Pi0VLM
from vla_train.models.run_dir import load_run_dir
from vla_train.training.checkpoint_io import consolidate_checkpoint, consolidated_path

RECIPE = "tiny-pi0"


def pi0_args(data, runs, *extra: str) -> list[str]:
    return recipe_args(data, runs, RECIPE, *extra)


def _run_dir(runs):
    return recipe_run_dir(runs, RECIPE)


def test_pi0_resume_reproduces_a_straight_run_exactly(demo_data, tmp_path):
    """Stopped at step 3 and resumed, the run equals the straight run loss for loss (the flow-matching noise and
    times included) and its EMA (the recipe's, decay 0.99) tensor for tensor; the expert layers train in FP32 inside
    the joint units; statistics are MEAN_STD. A checkpoint consolidated offline holds the EMA weights, as the online
    consolidated save writes them."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--vla.max_steps", "6", "--save_interval", "3"]
    first = torchrun(pi0_args(demo_data, straight, *common))
    assert_ok(first)
    assert "Held-out L1 (normalized actions)" in first.stderr
    assert_ok(torchrun(pi0_args(demo_data, split, *common, "--stop_after_steps", "3")))
    resumed = torchrun(pi0_args(demo_data, split, *common, "--resume", "auto"))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr
    expected, got = step_losses(_run_dir(straight)), step_losses(_run_dir(split))
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert got == expected

    run_dir = _run_dir(straight)
    policy = json.loads((run_dir / "config.json").read_text())["vla"]["policy"]
    assert (policy["type"], policy["expert"], policy["chunk_length"]) == ("pi0", "tiny", 4)
    statistics = json.loads((run_dir / "dataset_statistics.json").read_text())
    assert statistics["demo_libero"]["action"]["normalization"] == "normal"  # MEAN_STD
    saved = FileSystemReader(next(run_dir.glob("checkpoints/step-000006-*[0-9]"))).read_metadata()
    keys = saved.state_dict_metadata
    expert_key = "llm_backbone.llm.model.layers.1.expert.mlp.down_proj.weight"
    assert keys[f"model.{expert_key}"].properties.dtype == torch.float32
    assert f"optimizer.state.{expert_key}.exp_avg" in keys and "optimizer.state.state_proj.weight.exp_avg" in keys
    assert f"ema.{expert_key}" in keys and "ema.llm_backbone.llm.model.norm.weight" not in keys  # frozen: unused

    def final(run):
        (directory,) = [p for p in run.glob("checkpoints/step-000006-*") if p.is_dir()]
        return directory

    online = torch.load(consolidated_path(final(run_dir)), weights_only=True)["model"]
    resumed_dir = final(_run_dir(split))
    consolidated_path(resumed_dir).unlink()  # as if saved with --save_consolidated never
    offline = torch.load(consolidate_checkpoint(resumed_dir), weights_only=True)["model"]
    assert online.keys() == offline.keys()
    for module, state in online.items():  # exact resume of the EMA, and the EMA in both consolidations
        assert all(torch.equal(tensor, offline[module][key]) for key, tensor in state.items()), module
    straight_state = tmp_path / "straight.pt"
    dcp_to_torch_save(final(run_dir), straight_state)
    ema = torch.load(straight_state, weights_only=False)["ema"]
    assert torch.equal(online["llm_backbone"][expert_key.removeprefix("llm_backbone.")], ema[expert_key])


def test_pi0_exports_to_lerobot_imports_back_and_fine_tunes(demo_data, tmp_path):
    """A trained run -> LeRobot's layout (export_hf) -> import -> the same weights and the same predicted chunk;
    train.py then fine-tunes from the imported checkpoint with openpi-style LoRA (per-expert ranks, SigLIP in full)."""
    runs = tmp_path / "runs"
    assert_ok(torchrun(pi0_args(demo_data, runs, "--vla.max_steps", "2")))
    run_dir = _run_dir(runs)
    exported = export_hf(run_dir, tmp_path / "lerobot")
    config = json.loads((exported / "config.json").read_text())
    assert (config["type"], config["chunk_size"], config["max_action_dim"]) == ("pi0", 4, 32)
    assert (exported / "model.safetensors").is_file() and (exported / "dataset_statistics.json").is_file()
    checkpoint = import_pi0_lerobot(exported, tmp_path / "imported")

    statistics = json.loads((tmp_path / "imported" / "dataset_statistics.json").read_text())
    assert statistics == json.loads((run_dir / "dataset_statistics.json").read_text())
    trained = load_run_dir(run_dir, vla=True, norm_stats=statistics)
    imported = load_run_dir(tmp_path / "imported", vla=True, norm_stats=statistics)
    assert isinstance(imported, Pi0VLM)
    assert all(torch.equal(value, imported.state_dict()[key]) for key, value in trained.state_dict().items())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    proprio = rng.normal(size=9).astype(np.float32)
    expected = trained.eval().predict_action(images, "put the bowl on the plate", proprio, "demo_libero", seed=1)
    got = imported.eval().predict_action(images, "put the bowl on the plate", proprio, "demo_libero", seed=1)
    assert expected.shape == (4, 7) and np.isfinite(expected).all()
    np.testing.assert_array_equal(got, expected)

    served = load_run_dir_model(run_dir)  # the action server: the same chunk for the same seed
    assert isinstance(served, Pi0ActionModel) and served.policy.describe()["type"] == "pi0"
    with TestClient(create_app(served)) as client:
        body = json_numpy.dumps({"image": np.asarray(images[0]), "wrist_image": np.asarray(images[1]),
                                 "instruction": "put the bowl on the plate", "proprio": proprio.tolist(),
                                 "unnorm_key": "demo_libero", "seed": 1})
        response = client.post("/act", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.asarray(response.json()), expected, rtol=1e-5, atol=1e-6)

    lora = ["--vla.lora.enabled", "true", "--vla.lora.modules", "[llm_backbone]", "--vla.lora.full_modules",
            "[vision_backbone, projector]", "--vla.lora.rank", "4", "--vla.lora.alpha", "4", "--vla.lora.rank_pattern",
            "{'expert\\..*': 8}"]  # openpi's LoRA variants at test size: the expert's rank twice the VLM's
    result = torchrun(pi0_args(demo_data, tmp_path / "finetune", "--vla.max_steps", "2", "--pretrained_checkpoint",
                               str(checkpoint), "--is_resume", "false", *lora))
    assert_ok(result)
    assert f"from {checkpoint}" in result.stderr
    assert "with LoRA r=4 (expert\\..*: r=8) (adapters, ['vision_backbone', 'projector'] in full)" in result.stderr
    finetuned = _run_dir(tmp_path / "finetune")
    assert sorted(step_losses(finetuned)) == [1, 2]
    merged = load_run_dir(finetuned)  # the consolidated checkpoint: merged adapters, loadable without peft
    assert isinstance(merged, Pi0VLM) and not any("lora_" in key for key in merged.state_dict())
