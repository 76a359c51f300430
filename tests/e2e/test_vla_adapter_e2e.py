"""torchrun, 2 processes, gloo: the VLA-Adapter policy (`tiny-vla-adapter`: LoRA, ActionQueries, Bridge blocks as
their own FSDP2 units with activation checkpointing) trains, resumes exactly, writes VLA-Adapter's checkpoint files,
and fine-tunes from an imported VLA-Adapter release."""

import json

import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.e2e.conftest import assert_ok, recipe_args, recipe_run_dir, step_losses, torchrun
from vla_train.config.train import load_train_config
from vla_train.export.oft_files import read_oft_step_files
from vla_train.export.vla_adapter_files import from_upstream_head
from vla_train.models.run_dir import load_base_vlm, load_run_dir
from vla_train.models.vla_adapter.model import VLAAdapterVLM

RECIPE = "tiny-vla-adapter"
BASE_VLM = "tiny-dinosiglip+tiny-qwen25"


def adapter_args(data, runs, *extra: str) -> list[str]:
    return recipe_args(data, runs, RECIPE, *extra)


def _run_dir(runs):
    return recipe_run_dir(runs, RECIPE)


def test_vla_adapter_lora_resume_reproduces_a_straight_run_exactly(demo_data, tmp_path):
    """Stopped at step 3 and resumed, the run equals the straight run loss for loss; the consolidated checkpoint is
    the merged model with trained ActionQueries, Bridge policy and proprio projector; the step directory holds
    VLA-Adapter's files, which load back into a fresh model as the trained modules."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--vla.max_steps", "6", "--vla.lr_decay_steps", "3", "--save_interval", "2"]
    first = torchrun(adapter_args(demo_data, straight, *common))
    assert_ok(first)
    assert "with LoRA r=8 (adapters only)" in first.stderr
    assert "Held-out L1 (normalized actions)" in first.stderr and "mean-action baseline" in first.stderr
    assert_ok(torchrun(adapter_args(demo_data, split, *common, "--stop_after_steps", "3")))
    resumed = torchrun(adapter_args(demo_data, split, *common, "--resume", "auto"))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr
    expected, got = step_losses(_run_dir(straight)), step_losses(_run_dir(split))
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert got == expected  # bit-identical per-step losses, the query noise included

    run_dir = _run_dir(straight)
    policy = json.loads((run_dir / "config.json").read_text())["vla"]["policy"]
    assert (policy["type"], policy["num_action_queries"], policy["block"]) == ("vla-adapter", 16, "pro")
    saved = FileSystemReader(next(run_dir.glob("checkpoints/step-000006-*[0-9]"))).read_metadata()
    keys = saved.state_dict_metadata
    assert keys["model.action_queries.weight"].properties.dtype == torch.float32
    assert "optimizer.state.action_queries.weight.exp_avg" in keys  # trained in full beside the adapters
    assert not [k for k in keys if k.startswith("optimizer.state.") and ".base_layer." in k]

    merged = load_run_dir(run_dir)
    assert isinstance(merged, VLAAdapterVLM) and merged.num_policy_blocks == 2
    initial = merged.added_state()
    trained = merged.state_dict()
    for key in ("action_queries.weight", "action_head.model.mlp_resnet_blocks.1.gating_factor",
                "action_head.model.fc2.weight", "proprio_projector.fc1.weight"):
        assert not torch.equal(initial[key], trained[key]), key  # started from added_state and trained
    assert torch.count_nonzero(initial["action_queries.weight"]) == 0  # zero init, as upstream
    base = load_base_vlm(BASE_VLM).state_dict()
    norms = [k for k in base if k.startswith("llm_backbone.") and "norm" in k]
    assert norms and all(torch.equal(base[k], trained[k]) for k in norms)  # frozen, not adapted

    (directory,) = [p for p in run_dir.glob("checkpoints/step-000006-*") if p.is_dir()]
    names = {p.name for p in directory.iterdir()}
    assert {"action_head--6_checkpoint.pt", "proprio_projector--6_checkpoint.pt", "lora_adapter",
            "dataset_statistics.json"} <= names
    files = read_oft_step_files(directory, 6)
    assert "model.mlp_resnet_blocks.0.film_gen.0.weight" in files["action_head"]  # upstream's strict layout
    fresh = load_train_config(run_dir).vla.policy.build_model(load_base_vlm(BASE_VLM, vla=True))
    assert isinstance(fresh, VLAAdapterVLM)
    for piece in ("action_head", "proprio_projector"):  # upstream's files load strictly into a fresh policy
        getattr(fresh, piece).load_state_dict(from_upstream_head(files[piece]), strict=True)
        for key, value in getattr(fresh, piece).state_dict().items():
            torch.testing.assert_close(value, trained[f"{piece}.{key}"], rtol=1e-5, atol=1e-6)


def test_fine_tunes_from_an_imported_vla_adapter_release(demo_data, tmp_path):
    """VLA-Adapter's release layout (merged model with action_queries + action_head / proprio_projector files) ->
    import -> train.py from it: the imported ActionQueries and Bridge policy are the starting weights."""
    from vla_train.config.vla import get_vla_config
    from vla_train.export.hf import export_hf
    from vla_train.export.hf_import import import_hf
    from vla_train.export.oft_run import write_tiny_oft_run

    policy = get_vla_config(RECIPE).policy
    release = export_hf(write_tiny_oft_run(BASE_VLM, tmp_path / "source", policy, seed=5), tmp_path / "release")
    checkpoint = import_hf(release, tmp_path / "imported", chunk_length=policy.chunk_length, cameras=policy.cameras)
    result = torchrun(adapter_args(demo_data, tmp_path / "runs", "--vla.max_steps", "2", "--pretrained_checkpoint",
                                   str(checkpoint), "--is_resume", "false"))
    assert_ok(result)
    assert f"from {checkpoint}" in result.stderr
    assert sorted(step_losses(_run_dir(tmp_path / "runs"))) == [1, 2]
