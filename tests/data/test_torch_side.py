import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import build_tiny
from vla_train.data.collator import IGNORE_INDEX, PaddedCollatorForActionPrediction
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.torch_dataset import RLDSBatchTransform, RLDSDataset
from vla_train.models.action_tokenizer import ActionTokenizer


def _batch_transform(vlm) -> RLDSBatchTransform:
    tokenizer = vlm.llm_backbone.get_tokenizer()
    return RLDSBatchTransform(ActionTokenizer(tokenizer), tokenizer, vlm.vision_backbone.get_image_transform(),
                              vlm.llm_backbone.prompt_builder_fn)


def _frame(instruction=b"Pick Up The Cup", action=(0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0)):
    rng = np.random.default_rng(0)
    return {"observation": {"image_primary": rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)},
            "task": {"language_instruction": instruction}, "action": np.array([action], np.float32),
            "dataset_name": b"demo"}


@pytest.mark.parametrize("model_id", ["tiny-dinosiglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25"])
def test_batch_transform_supervises_only_actions_and_stop(model_id):
    vlm = build_tiny(model_id)
    transform = _batch_transform(vlm)
    item = transform(_frame())
    tokenizer = vlm.llm_backbone.get_tokenizer()
    supervised = item["labels"][item["labels"] != IGNORE_INDEX]
    action_ids = ActionTokenizer(tokenizer).encode_to_ids(_frame()["action"][0])
    assert supervised[:7].tolist() == action_ids.tolist()
    assert len(supervised) == 7 + len(tokenizer(vlm.llm_backbone.prompt_builder_fn.stop_text.rstrip(),
                                                add_special_tokens=False).input_ids)
    assert "what action should the robot take to pick up the cup?" in tokenizer.decode(item["input_ids"]).lower()
    assert item["dataset_name"] == b"demo"
    assert isinstance(item["pixel_values"], dict) and item["pixel_values"]["dino"].shape == (3, 64, 64)


def test_collator_pads_truncates_and_masks():
    collate = PaddedCollatorForActionPrediction(model_max_length=5, pad_token_id=0)
    batch = collate([
        {"input_ids": torch.tensor([1, 7, 0, 9]), "labels": torch.tensor([-100, 7, 0, 9]),
         "pixel_values": torch.ones(3, 2, 2), "dataset_name": b"a"},
        {"input_ids": torch.tensor([1, 5, 6, 7, 8, 9, 10]), "labels": torch.tensor([-100, 5, 6, 7, 8, 9, 10]),
         "pixel_values": torch.zeros(3, 2, 2), "dataset_name": b"b"},
    ])
    assert batch["input_ids"].tolist() == [[1, 7, 0, 9, 0], [1, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 7, 0, 9, -100], [-100, 5, 6, 7, 8]]
    # a real token equal to the pad id (position 2 of row 0) stays visible: the mask comes from lengths
    assert batch["attention_mask"].tolist() == [[True, True, True, True, False], [True] * 5]
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["dataset_names"] == [b"a", b"b"]


def test_collator_stacks_fused_pixels_and_rejects_bad_input():
    collate = PaddedCollatorForActionPrediction(model_max_length=8, pad_token_id=0)
    item = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]),
            "pixel_values": {"dino": torch.ones(3, 2, 2), "siglip": torch.zeros(3, 2, 2)}}
    batch = collate([item, item])
    assert set(batch["pixel_values"]) == {"dino", "siglip"} and batch["pixel_values"]["dino"].shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="pixel_values"):
        collate([{**item, "pixel_values": None}])
    with pytest.raises(ValueError, match="right padding"):
        PaddedCollatorForActionPrediction(8, 0, padding_side="left")


def test_rlds_dataset_feeds_a_dataloader_and_the_model(fixture_root, fixture_registry):
    vlm = build_tiny("tiny-dinosiglip+tiny-llama")
    cfg = PipelineConfig(data_root_dir=fixture_root / "data", data_mix="mix", resize_resolution=(64, 64),
                         shuffle_buffer_size=8, deterministic=True)
    dataset = RLDSDataset(cfg, _batch_transform(vlm), plan=plan_mixture(cfg, fixture_registry))
    assert len(dataset) == dataset.plan.dataset_length
    tokenizer = vlm.llm_backbone.get_tokenizer()
    collate = PaddedCollatorForActionPrediction(tokenizer.model_max_length, tokenizer.pad_token_id)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"]["siglip"].shape == (4, 3, 64, 64)
    with torch.no_grad():
        output = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(output.loss)
    assert dataset.state_dict()["frames_yielded"] == 4
    assert set(dataset.dataset_statistics) == {"ds_a", "ds_b"}


def test_non_deterministic_resume_reseeds_instead_of_replaying(fixture_root, fixture_registry):
    cfg = PipelineConfig(data_root_dir=fixture_root / "data", data_mix="mix", resize_resolution=(8, 8),
                         shuffle_buffer_size=8, deterministic=False)
    plan = plan_mixture(cfg, fixture_registry)
    dataset = RLDSDataset(cfg, plan=plan)
    first = [f["action"][0].tolist() for f in itertools.islice(dataset.frames(), 12)]
    resumed = RLDSDataset(cfg, plan=plan)
    resumed.load_state_dict(dataset.state_dict())
    again = [f["action"][0].tolist() for f in itertools.islice(resumed.frames(), 12)]
    assert again != first and resumed.state_dict()["frames_yielded"] == 24
