"""Chunk policies' samples (OFT's layout): the whole chunk's action tokens in the prompt's answer, the normalized chunk
with its validity mask, proprio, and every camera's pixels on a camera axis, float or uint8; collated and pinned."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import build_tiny
from vla_train.data.collator import IGNORE_INDEX, PaddedCollatorForActionPrediction
from vla_train.data.sample import DataNeeds
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.policies.chunk_processor import ChunkBatchTransform

CHUNK, ACTION_DIM, PROPRIO_DIM = 3, 7, 5
NEEDS = DataNeeds(chunk_length=CHUNK, cameras=("primary", "wrist"), proprio=True)


def _frame(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation": {"image_primary": rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8),
                            "image_wrist": rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8),
                            "proprio": rng.uniform(-1, 1, (1, PROPRIO_DIM)).astype(np.float32),
                            "pad_mask": np.ones(1, bool)},
            "task": {"language_instruction": b"Stack The Blocks"},
            "action": rng.uniform(-1, 1, (CHUNK, ACTION_DIM)).astype(np.float32),
            "action_pad_mask": np.array([True, True, False]), "dataset_name": b"demo"}


def _transform(vlm, uint8_pixels: bool = False) -> ChunkBatchTransform:
    tokenizer = vlm.llm_backbone.get_tokenizer()
    return ChunkBatchTransform(ActionTokenizer(tokenizer), tokenizer, vlm.vision_backbone.get_image_transform(),
                               vlm.llm_backbone.prompt_builder_fn, NEEDS, uint8_pixels=uint8_pixels)


@pytest.fixture(scope="module")
def vlm():
    return build_tiny("tiny-dinosiglip+tiny-llama")


def test_the_answer_is_the_whole_chunk_step_major_then_stop(vlm):
    frame, item = _frame(), _transform(vlm)(_frame())
    tokenizer = vlm.llm_backbone.get_tokenizer()
    supervised = item["labels"][item["labels"] != IGNORE_INDEX]
    expected = ActionTokenizer(tokenizer).encode_to_ids(frame["action"]).reshape(-1)  # t's 7 ids, then t+1's, ...
    stop = tokenizer(vlm.llm_backbone.prompt_builder_fn.stop_text.rstrip(), add_special_tokens=False).input_ids
    assert supervised.tolist() == [*expected.tolist(), *stop]
    assert item["input_ids"][-len(supervised):].tolist() == supervised.tolist()  # the answer closes the sequence
    assert "what action should the robot take to stack the blocks?" in tokenizer.decode(item["input_ids"]).lower()


def test_the_chunk_mask_proprio_and_cameras_come_from_the_frame(vlm):
    frame, item = _frame(), _transform(vlm)(_frame())
    assert torch.equal(item["actions"], torch.from_numpy(frame["action"]))
    assert item["action_mask"].tolist() == [True, True, False]
    assert torch.equal(item["proprio"], torch.from_numpy(frame["observation"]["proprio"][0]))
    transform = vlm.vision_backbone.get_image_transform()
    for index, role in enumerate(NEEDS.cameras):
        expected = transform(Image.fromarray(frame["observation"][f"image_{role}"][0]))
        assert all(torch.equal(item["pixel_values"][k][index], expected[k]) for k in expected)
    assert item["pixel_values"]["dino"].shape == (2, 3, 64, 64)


def test_uint8_cameras_normalize_on_the_device_to_the_float_pixels_and_collate(vlm):
    float_items = [_transform(vlm)(_frame(seed)) for seed in range(2)]
    items = [_transform(vlm, uint8_pixels=True)(_frame(seed)) for seed in range(2)]
    tokenizer = vlm.llm_backbone.get_tokenizer()
    collate = PaddedCollatorForActionPrediction(tokenizer.model_max_length, tokenizer.pad_token_id)
    batch, float_batch = collate(items), collate(float_items)
    assert batch["pixel_values"]["dino"].shape == (2, 2, 64, 64, 3)  # [B, cameras, S, S, 3] uint8
    assert batch["pixel_values"]["dino"] is batch["pixel_values"]["siglip"]  # one geometry: one tensor
    normalized = vlm.vision_backbone.get_image_transform().normalize_on_device(batch["pixel_values"])
    assert all(torch.equal(normalized[k], float_batch["pixel_values"][k]) for k in ("dino", "siglip"))
    assert batch["actions"].shape == (2, CHUNK, ACTION_DIM) and batch["action_mask"].shape == (2, CHUNK)
    assert batch["proprio"].shape == (2, PROPRIO_DIM) and batch["dataset_names"] == ["demo", "demo"]
    assert torch.equal(batch["actions"][1], float_batch["actions"][1])


def test_a_frame_without_a_needed_camera_is_refused_by_name(vlm):
    frame = _frame()
    del frame["observation"]["image_wrist"]
    with pytest.raises(ValueError, match="observation.image_wrist"):
        _transform(vlm)(frame)
