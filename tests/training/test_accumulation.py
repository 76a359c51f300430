"""Token-weighted gradient accumulation: micro-batches scaled by the global supervised-token count give the gradient
of one big batch, whatever the padding (what the trainer relies on through `num_items_in_batch`)."""

import numpy as np
import torch

from tests.conftest import batch_pixels, build_tiny
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.models.vla_prompt import vla_training_ids


def _items(vlm, rgb_image):
    tokenizer = vlm.llm_backbone.get_tokenizer()
    pixels = batch_pixels(vlm, rgb_image)
    items = []
    for instruction, action in (("pick up the cup", 0.1), ("open the top drawer of the cabinet", -0.4),
                                ("wave", 0.7), ("stack the red block on the blue one", 0.0)):
        ids, labels = vla_training_ids(vlm.llm_backbone.prompt_builder_fn, tokenizer, instruction,
                                       vlm.action_tokenizer.encode_to_ids(np.full(7, action)))
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                      "pixel_values": {k: v[0] for k, v in pixels.items()}})
    return items, PaddedCollatorForActionPrediction(512, tokenizer.pad_token_id)


def _grads(vlm):
    return [p.grad.clone() for p in vlm.parameters() if p.grad is not None]


def test_accumulated_micro_batches_equal_one_big_batch(rgb_image):
    vlm = build_tiny("tiny-dinosiglip+tiny-llama", vla=True)
    items, collate = _items(vlm, rgb_image)
    big = collate(items)
    vlm(**{k: big[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss.backward()
    expected = _grads(vlm)
    vlm.zero_grad()
    micro = [collate(items[:1]), collate(items[1:])]  # unequal sizes and paddings
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    for batch in micro:
        out = vlm(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")},
                  num_items_in_batch=total)
        out.loss.backward()
    for got, want in zip(_grads(vlm), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
