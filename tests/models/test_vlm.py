import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODEL_IDS, batch_pixels, build_tiny
from vla_train.models.projector import FusedMLPProjector, LinearProjector, MLPProjector, build_projector
from vla_train.models.vla_prompt import vla_training_ids
from vla_train.models.vlm import IGNORE_INDEX


def _sample(vlm, instruction="pick up the red cup", actions=(0.1, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5)):
    ids, labels = vla_training_ids(vlm.llm_backbone.prompt_builder_fn, vlm.llm_backbone.get_tokenizer(), instruction,
                                   vlm.action_tokenizer.encode_to_ids(np.array(actions)))
    return torch.tensor([ids]), torch.tensor([labels])


@pytest.mark.parametrize("model_id", TINY_MODEL_IDS)
def test_forward_splices_patches_after_bos_and_masks_their_labels(model_id, rgb_image):
    vlm = build_tiny(model_id, vla=True).eval()
    input_ids, labels = _sample(vlm)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    pixels = batch_pixels(vlm, rgb_image)
    with torch.no_grad():
        out = vlm(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        patches = vlm.projector(vlm.vision_backbone(pixels))
        embeds = vlm.llm_backbone.embed_input_ids(input_ids)
        fused = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)
        manual = vlm.llm_backbone.llm(inputs_embeds=fused).logits
    num_patches = vlm.num_patches
    assert out.logits.shape == (1, input_ids.shape[1] + num_patches, vlm.llm_backbone.llm.config.vocab_size)
    torch.testing.assert_close(out.logits, manual)
    fused_labels = torch.cat([labels[:, :1], torch.full((1, num_patches), IGNORE_INDEX), labels[:, 1:]], dim=1)
    expected_loss = F.cross_entropy(manual[0, :-1].float(), fused_labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected_loss)
    assert (labels != IGNORE_INDEX).sum() == 8  # 7 action tokens + the stop token


def test_attention_mask_excludes_padding(rgb_image):
    vlm = build_tiny("tiny-dinosiglip+tiny-llama", vla=True).eval()
    input_ids, labels = _sample(vlm)
    pad_id = vlm.llm_backbone.get_tokenizer().pad_token_id
    padded = torch.cat([input_ids, torch.full((1, 5), pad_id)], dim=1)
    padded_labels = torch.cat([labels, torch.full((1, 5), IGNORE_INDEX)], dim=1)
    pixels = batch_pixels(vlm, rgb_image)
    with torch.no_grad():
        plain = vlm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids, dtype=torch.bool),
                    pixel_values=pixels, labels=labels)
        masked = vlm(input_ids=padded, attention_mask=padded != pad_id, pixel_values=pixels, labels=padded_labels)
    length = plain.logits.shape[1]
    torch.testing.assert_close(masked.logits[:, :length], plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked.loss, plain.loss, rtol=1e-5, atol=1e-6)


def test_multimodal_indices_select_rows(rgb_image):
    vlm = build_tiny("tiny-siglip+tiny-llama", vla=True).eval()
    input_ids, labels = _sample(vlm)
    batch_ids, batch_labels = input_ids.repeat(2, 1), labels.repeat(2, 1)
    pixels = batch_pixels(vlm, rgb_image).repeat(2, 1, 1, 1)
    mask = torch.ones_like(batch_ids, dtype=torch.bool)
    with torch.no_grad():
        both = vlm(input_ids=batch_ids, attention_mask=mask, pixel_values=pixels, labels=batch_labels)
        first = vlm(input_ids=batch_ids, attention_mask=mask, pixel_values=pixels, labels=batch_labels,
                    multimodal_indices=torch.tensor([0]))
        text_only = vlm(input_ids=batch_ids, attention_mask=mask, pixel_values=None, labels=batch_labels,
                        multimodal_indices=torch.tensor([], dtype=torch.long))
    torch.testing.assert_close(first.logits[0], both.logits[0])
    assert first.logits.shape == both.logits.shape  # the text row is padded with P positions at the end
    text_len = batch_ids.shape[1]
    with torch.no_grad():
        text_logits = vlm.llm_backbone(input_ids=batch_ids[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(first.logits[1, :text_len], text_logits[0], rtol=1e-5, atol=1e-5)
    assert text_only.logits.shape == (2, text_len, both.logits.shape[2])


def test_forward_errors_are_clear():
    vlm = build_tiny("tiny-siglip+tiny-llama")
    with pytest.raises(ValueError, match="needs pixel_values"):
        vlm(input_ids=torch.tensor([[1, 5, 6]]))


def test_projector_keys_match_reference_checkpoints():
    assert list(build_projector("linear", 8, 16).state_dict()) == ["projector.0.weight", "projector.0.bias"]
    mlp = build_projector("no-align+gelu-mlp", 8, 16)
    assert isinstance(mlp, MLPProjector)
    assert list(mlp.state_dict()) == ["projector.0.weight", "projector.0.bias", "projector.2.weight",
                                      "projector.2.bias"]
    fused = build_projector("no-align+fused-gelu-mlp", 8, 16)
    assert isinstance(fused, FusedMLPProjector)
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items() if k.endswith("weight")} == {
        "projector.0.weight": (32, 8), "projector.2.weight": (16, 32), "projector.4.weight": (16, 16)}
    assert isinstance(build_projector("linear", 8, 16), LinearProjector)
    with pytest.raises(ValueError, match="Unknown arch_specifier 'no-align\\+mlp3'"):
        build_projector("no-align+mlp3", 8, 16)


def test_projector_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_tiny("tiny-siglip+tiny-llama")
    torch.random.set_rng_state(before)
    b = build_tiny("tiny-siglip+tiny-llama")
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
