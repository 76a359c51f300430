"""VLA-Adapter interoperability: a run exports as VLA-Adapter releases its models (OpenVLA layout + action_queries,
`action_head--*` with upstream's film_gen, `proprio_projector--*`), imports back (also from an upstream-style file
with DDP prefixes) to a run that predicts the same chunk, and serves that chunk over HTTP."""

import json

import json_numpy
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from tests.export.conftest import OFT_A, OFT_H, OFT_P, camera_images, load_native_oft, pil, proprio_state
from vla_train.config.policy import VLAAdapterPolicyConfig, read_policy_config
from vla_train.export.hf import export_hf
from vla_train.export.hf_import import import_hf
from vla_train.export.oft_run import UNNORM_KEY, write_tiny_oft_run
from vla_train.export.server import create_app, load_run_dir_model
from vla_train.export.server_oft import OFTActionModel
from vla_train.models.vla_adapter.model import VLAAdapterVLM

MODEL_ID = "tiny-dinosiglip+tiny-qwen25"
QUERIES = 6
CAMERAS = ["primary", "wrist"]


def _policy(block: str = "pro") -> VLAAdapterPolicyConfig:
    return VLAAdapterPolicyConfig(chunk_length=OFT_H, action_dim=OFT_A, proprio_dim=OFT_P, cameras=CAMERAS,
                                  num_action_queries=QUERIES, block=block)


def _chunk(model: VLAAdapterVLM, case: int = 0) -> np.ndarray:
    return model.predict_action(pil(camera_images(case)), "pick up the cup", proprio_state(case), UNNORM_KEY)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla_adapter")
    run_dir = write_tiny_oft_run(MODEL_ID, root / "run", _policy(), seed=3)
    return run_dir, export_hf(run_dir, root / "hf")


def test_export_writes_vla_adapters_release_layout(adapter_dirs):
    run_dir, hf_dir = adapter_dirs
    native = load_native_oft(run_dir)
    weights = load_file(hf_dir / "model.safetensors")
    torch.testing.assert_close(weights["action_queries.weight"], native.action_queries.weight.detach())
    assert any(key.startswith("language_model.model.layers.") for key in weights)
    head = torch.load(hf_dir / "action_head--latest_checkpoint.pt", weights_only=True)
    blocks = native.num_policy_blocks
    assert sum(key.endswith("film_gen.0.weight") for key in head) == blocks  # upstream's Pro layout, strict-loadable
    assert not head["model.mlp_resnet_blocks.0.film_gen.0.weight"].any()
    torch.testing.assert_close(head["model.mlp_resnet_blocks.1.k_task.weight"],
                               native.action_head.model.mlp_resnet_blocks[1].k_task.weight.detach())
    proprio = torch.load(hf_dir / "proprio_projector--latest_checkpoint.pt", weights_only=True)
    assert set(proprio) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert json.loads((hf_dir / "dataset_statistics.json").read_text()).keys() == {UNNORM_KEY}


def test_export_import_round_trip_predicts_the_same_chunk(adapter_dirs, tmp_path):
    run_dir, hf_dir = adapter_dirs
    expected = _chunk(load_native_oft(run_dir))
    assert expected.shape == (OFT_H, OFT_A)
    checkpoint = import_hf(hf_dir, tmp_path / "imported", chunk_length=OFT_H, cameras=CAMERAS)
    policy = read_policy_config(tmp_path / "imported")
    assert policy == _policy()  # the block, query count, action and proprio sizes come from the files
    imported = load_native_oft(tmp_path / "imported")
    assert isinstance(imported, VLAAdapterVLM) and checkpoint.is_file()
    np.testing.assert_array_equal(_chunk(imported), expected)


def test_upstream_files_with_ddp_prefixes_and_film_gen_import(adapter_dirs, tmp_path):
    """VLA-Adapter's DDP-saved files (`module.` keys, a trained-looking film_gen we do not use) import to the same
    policy; without --chunk_length the import names the missing options and writes nothing."""
    run_dir, hf_dir = adapter_dirs
    release = tmp_path / "release"
    release.mkdir()
    for path in hf_dir.iterdir():
        if path.is_file():
            (release / path.name).write_bytes(path.read_bytes())
    for piece in ("action_head", "proprio_projector"):
        path = release / f"{piece}--latest_checkpoint.pt"
        state = torch.load(path, weights_only=True)
        state = {f"module.{k}": (torch.randn_like(v) if "film_gen" in k else v) for k, v in state.items()}
        path.unlink()
        torch.save(state, release / f"{piece}--20000_checkpoint.pt")
    with pytest.raises(ValueError, match="pass --chunk_length and --cameras"):
        import_hf(release, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    import_hf(release, tmp_path / "imported", chunk_length=OFT_H, cameras=CAMERAS)
    np.testing.assert_array_equal(_chunk(load_native_oft(tmp_path / "imported")),
                                  _chunk(load_native_oft(run_dir)))


def test_the_original_block_round_trips(tmp_path):
    run_dir = write_tiny_oft_run(MODEL_ID, tmp_path / "run", _policy("original"), seed=1)
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    head = torch.load(hf_dir / "action_head--latest_checkpoint.pt", weights_only=True)
    assert "model.mlp_resnet_blocks.0.k_proj.weight" in head and not any("film_gen" in k for k in head)
    import_hf(hf_dir, tmp_path / "imported", chunk_length=OFT_H, cameras=CAMERAS)
    assert read_policy_config(tmp_path / "imported").block == "original"
    np.testing.assert_array_equal(_chunk(load_native_oft(tmp_path / "imported")),
                                  _chunk(load_native_oft(run_dir)))


def test_a_run_directory_serves_its_chunks(adapter_dirs):
    run_dir, _ = adapter_dirs
    model = load_run_dir_model(run_dir)
    assert isinstance(model, OFTActionModel) and model.num_generated == QUERIES  # the placeholders, no stop ids
    with TestClient(create_app(model)) as client:
        primary, wrist = camera_images(2)
        body = json_numpy.dumps({"image": primary, "wrist_image": wrist, "instruction": "pick up the cup",
                                 "proprio": proprio_state(2).tolist(), "unnorm_key": UNNORM_KEY})
        response = client.post("/act", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(np.asarray(response.json()), _chunk(model.model, 2))


def test_hub_file_names_and_a_policy_without_proprio_import(tmp_path):
    """Hub releases name their files `<piece>--checkpoint.pt`; a run without proprio has no proprio file."""
    run_dir = write_tiny_oft_run(MODEL_ID, tmp_path / "run", VLAAdapterPolicyConfig(
        chunk_length=OFT_H, action_dim=OFT_A, proprio_dim=0, cameras=CAMERAS, num_action_queries=QUERIES), seed=2)
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    assert not list(hf_dir.glob("proprio_projector--*"))
    (hf_dir / "action_head--latest_checkpoint.pt").rename(hf_dir / "action_head--checkpoint.pt")
    import_hf(hf_dir, tmp_path / "imported", chunk_length=OFT_H, cameras=CAMERAS)
    assert read_policy_config(tmp_path / "imported").proprio_dim == 0
    images = pil(camera_images(0))
    np.testing.assert_array_equal(load_native_oft(tmp_path / "imported").predict_action(images, "wave"),
                                  load_native_oft(run_dir).predict_action(images, "wave"))


def test_incomplete_inputs_are_refused_with_what_is_missing(adapter_dirs, tmp_path):
    run_dir, hf_dir = adapter_dirs
    no_head = tmp_path / "no_head"
    no_head.mkdir()
    for path in hf_dir.iterdir():
        if path.is_file() and not path.name.startswith("action_head--"):
            (no_head / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="no VLA-Adapter action head file"):
        import_hf(no_head, tmp_path / "imported", chunk_length=OFT_H, cameras=CAMERAS)
    assert not (tmp_path / "imported").exists()

    base_only = tmp_path / "base_only"  # a VLA-Adapter run directory whose checkpoint holds only the base VLM
    base_only.mkdir()
    for name in ("config.json", "dataset_statistics.json"):
        (base_only / name).write_bytes((run_dir / name).read_bytes())
    state = torch.load(run_dir / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    keep = ("vision_backbone", "projector", "llm_backbone")
    (base_only / "checkpoints").mkdir()
    torch.save({"model": {k: v for k, v in state["model"].items() if k in keep}},
               base_only / "checkpoints" / "latest-checkpoint.pt")
    with pytest.raises(ValueError, match="needs the trained ActionQueries"):
        export_hf(base_only, tmp_path / "hf_refused")
