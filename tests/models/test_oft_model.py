import numpy as np
import pytest
import torch

from tests.conftest import batch_pixels, build_tiny
from vla_train.models.attention import bidirectional_mask
from vla_train.models.oft.model import OFTVLM
from vla_train.models.vla_prompt import vla_prompt_prefix_ids, vla_training_ids
from vla_train.models.vlm import IGNORE_INDEX

H, A, Q = 2, 3, 4  # chunk length, action dim, proprio dim
INSTRUCTIONS = ("pick up the red cup", "open the top drawer of the wooden cabinet")


def _oft(model_id="tiny-siglip+tiny-llama", **kwargs) -> OFTVLM:
    kwargs = {"action_dim": A, "chunk_length": H, "proprio_dim": Q, **kwargs}
    return OFTVLM.from_vlm(build_tiny(model_id, vla=True), **kwargs)


def _batch(model: OFTVLM, rgb_image, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two right-padded rows (different prompt lengths) in the processor's layout."""
    llm = model.llm_backbone
    rows = [vla_training_ids(llm.prompt_builder_fn, llm.get_tokenizer(), text,
                             model.action_tokenizer.encode_to_ids(actions[i].flatten().numpy()))
            for i, text in enumerate(INSTRUCTIONS)]
    length, pad = max(len(ids) for ids, _ in rows), llm.get_tokenizer().pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for _, lab in rows])
    mask = torch.tensor([[True] * len(ids) + [False] * (length - len(ids)) for ids, _ in rows])
    pixels = batch_pixels(model, rgb_image)
    if isinstance(pixels, dict):
        pixels = {k: v.repeat(2, 1, 1, 1) for k, v in pixels.items()}
    else:
        pixels = pixels.repeat(2, 1, 1, 1)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
            "proprio": torch.linspace(-1, 1, 2 * Q).reshape(2, Q)}


def _actions(seed=0) -> torch.Tensor:
    return torch.rand(2, H, A, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def _capture_llm_inputs(model: OFTVLM) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    return captured, model.llm_backbone.llm.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_sequence_layout_and_head_reads_one_before_each_slot(rgb_image):
    model = _oft().eval()
    batch = _batch(model, rgb_image, _actions())
    captured, handle = _capture_llm_inputs(model)
    with torch.no_grad():
        out = model(**batch)
    handle.remove()
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixel_values"]
    with torch.no_grad():
        emb = model.llm_backbone.embed_input_ids(ids)
        patches = model.projector(model.vision_backbone(pixels))
        proprio = model.proprio_projector(batch["proprio"])[:, None]
    num_prefix = model.num_patches + 1
    for row in range(2):
        prefix_len = int((labels[row] == IGNORE_INDEX).long().argmin())  # first supervised position
        assert (labels[row, prefix_len:prefix_len + H * A] >= model.action_tokenizer.action_token_begin_idx).all()
        text = emb[row].clone()
        text[prefix_len:prefix_len + H * A] = 0.0
        expected = torch.cat([text[:1], patches[row], proprio[row], text[1:]])
        torch.testing.assert_close(captured["inputs_embeds"][row], expected)
        # the stop token follows the zeroed slots
        assert ids[row, prefix_len + H * A] == model.stop_token_ids[0]
    # manual head read at (slot - 1) from the LLM's last hidden state
    padding = torch.cat([batch["attention_mask"][:, :1], torch.ones(2, num_prefix, dtype=torch.bool),
                         batch["attention_mask"][:, 1:]], dim=1)
    with torch.no_grad():
        hidden = model.llm_backbone.llm.model(inputs_embeds=captured["inputs_embeds"],
                                              attention_mask=bidirectional_mask(padding)).last_hidden_state
        for row in range(2):
            prefix_len = int((labels[row] == IGNORE_INDEX).long().argmin())
            read = [num_prefix + p - 1 for p in range(prefix_len, prefix_len + H * A)]
            manual = model.action_head.predict_action(hidden[row, read][None])
            torch.testing.assert_close(out.predicted_actions[row:row + 1], manual)
    assert out.predicted_actions.shape == (2, H, A) and out.loss is None


def test_padding_and_action_ids_do_not_change_predictions(rgb_image):
    model = _oft().eval()
    batch = _batch(model, rgb_image, _actions())
    with torch.no_grad():
        both = model(**batch).predicted_actions
        short = int(batch["attention_mask"][0].sum())  # row 0 alone, without its padding
        alone = {k: v[:1] for k, v in batch.items()}
        alone.update(input_ids=batch["input_ids"][:1, :short], attention_mask=batch["attention_mask"][:1, :short],
                     labels=batch["labels"][:1, :short])
        torch.testing.assert_close(model(**alone).predicted_actions[0], both[0], rtol=1e-5, atol=1e-5)
        # the action ids' embeddings are zeroed: other action ids give the same prediction
        other = _batch(model, rgb_image, _actions(seed=5))
        torch.testing.assert_close(model(**other).predicted_actions, both)
        # inference appends the slots and the stop ids itself: same prediction from the prompt prefixes
        llm = model.llm_backbone
        prefixes = [vla_prompt_prefix_ids(llm.prompt_builder_fn, llm.get_tokenizer(), text) for text in INSTRUCTIONS]
        length, pad = max(map(len, prefixes)), llm.get_tokenizer().pad_token_id
        ids = torch.tensor([p + [pad] * (length - len(p)) for p in prefixes])
        mask = torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p in prefixes])
        chunk = model.predict_action_chunk(ids, mask, batch["pixel_values"], proprio=batch["proprio"])
    torch.testing.assert_close(chunk, both, rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional(rgb_image):
    model = _oft().eval()
    batch = _batch(model, rgb_image, _actions())
    slots = model.action_slot_mask(batch["labels"])
    patches = model.patch_embeddings(batch["pixel_values"])
    changed = batch["input_ids"].clone()
    stop_pos = int(slots[0].nonzero().max()) + 1  # the stop token, after every slot
    changed[0, stop_pos] = 100
    with torch.no_grad():
        base = model.action_hidden_states(batch["input_ids"], batch["attention_mask"], patches, slots,
                                          batch["proprio"])
        after = model.action_hidden_states(changed, batch["attention_mask"], patches, slots, batch["proprio"])
    assert (base[0, 0] - after[0, 0]).abs().max() > 1e-4  # first slot's read sees a later token
    torch.testing.assert_close(base[1], after[1])  # rows stay independent


def test_loss_is_masked_l1_mean_or_sum_over_normalizer(rgb_image):
    model = _oft().eval()
    actions = _actions()
    batch = _batch(model, rgb_image, actions)
    action_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out = model(**batch, actions=actions, action_mask=action_mask)
        pred = out.predicted_actions.numpy()
        errors = np.abs(pred - actions.numpy())[action_mask.numpy()]
        assert out.count.item() == 3 * A
        np.testing.assert_allclose(out.loss.item(), errors.mean(), rtol=1e-5)
        np.testing.assert_allclose(out.loss_sum.item(), errors.sum(), rtol=1e-5)
        scaled = model(**batch, actions=actions, action_mask=action_mask, normalizer=7.0)
        np.testing.assert_allclose(scaled.loss.item(), errors.sum() / 7.0, rtol=1e-5)
        changed = actions.clone()
        changed[1, 1] = float("nan")  # invalid step: no contribution even as NaN
        torch.testing.assert_close(model(**batch, actions=changed, action_mask=action_mask).loss, out.loss)
        full = model(**batch, actions=actions).loss
    torch.testing.assert_close(full, torch.nn.functional.l1_loss(out.predicted_actions, actions))


def test_training_reduces_l1_loss(rgb_image):
    model = _oft().train()
    actions = _actions()
    batch = _batch(model, rgb_image, actions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(50):
        loss = model(**batch, actions=actions).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0], losses


def test_state_dict_keys_and_seeded_init():
    vlm = build_tiny("tiny-siglip+tiny-llama", vla=True)
    vlm_state = vlm.state_dict()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = OFTVLM.from_vlm(vlm, action_dim=A, chunk_length=H, proprio_dim=Q)
    assert torch.equal(torch.random.get_rng_state(), before)
    state = model.state_dict()
    assert list(state)[:len(vlm_state)] == list(vlm_state)
    for key, value in vlm_state.items():
        assert state[key].data_ptr() == value.data_ptr(), key  # adopted, not copied
    new = list(state)[len(vlm_state):]
    assert all(k.startswith("action_head.model.") for k in new[:-4])
    assert {"action_head.model.fc1.weight", "action_head.model.mlp_resnet_blocks.1.ffn.1.weight",
            "action_head.model.layer_norm2.bias", "action_head.model.fc2.bias"} <= set(new)
    d = vlm.llm_backbone.embed_dim
    assert state["action_head.model.fc1.weight"].shape == (d, d * A)
    assert new[-4:] == ["proprio_projector.fc1.weight", "proprio_projector.fc1.bias", "proprio_projector.fc2.weight",
                        "proprio_projector.fc2.bias"]
    assert model.trainable_module_keys[-2:] == ["action_head", "proprio_projector"]
    other = _oft()
    for key in new:
        torch.testing.assert_close(other.state_dict()[key], state[key])


def test_multi_camera_patches_concatenate_in_order(rgb_image):
    model = _oft("tiny-dinosiglip+tiny-llama").eval()
    first = batch_pixels(model, rgb_image)
    second = {k: v.flip(-1) for k, v in first.items()}
    with torch.no_grad():
        patches = model.patch_embeddings([first, second])
        expected = torch.cat([model.projector(model.vision_backbone(p)) for p in (first, second)], dim=1)
    assert patches.shape == (1, 2 * model.num_patches, model.llm_backbone.embed_dim)
    torch.testing.assert_close(patches, expected, rtol=1e-5, atol=1e-5)


def test_diffusion_head_loss_and_sampling(rgb_image):
    model = _oft(head="diffusion", proprio_dim=None).eval()
    actions = _actions()
    batch = _batch(model, rgb_image, actions)
    del batch["proprio"]
    action_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out = model(**batch, actions=actions, action_mask=action_mask, generator=torch.Generator().manual_seed(0))
        again = model(**batch, actions=actions, action_mask=action_mask, generator=torch.Generator().manual_seed(0),
                      normalizer=4.0)
        sampled = model.predict_action_chunk(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                             labels=batch["labels"], generator=torch.Generator().manual_seed(1),
                                             num_inference_steps=3)
        nan_actions = actions.clone()
        nan_actions[1, 1] = float("nan")  # padded step: replaced before noising, never reaches the LLM
        masked = model(**batch, actions=nan_actions, action_mask=action_mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masked.loss, out.loss)
    assert out.count.item() == 3 * A and out.predicted_noise.shape == (2, H, A)
    torch.testing.assert_close(out.loss, out.loss_sum / out.count)
    torch.testing.assert_close(again.loss, out.loss_sum / 4.0)
    assert sampled.shape == (2, H, A) and torch.isfinite(sampled).all()
    assert "noisy_action_projector.fc1.weight" in model.state_dict()
    assert any(k.startswith("action_head.noise_predictor.mlp_resnet.") for k in model.state_dict())


def test_labels_without_enough_action_slots_are_rejected(rgb_image):
    model = _oft().eval()
    batch = _batch(model, rgb_image, _actions())
    labels = batch["labels"].clone()
    labels[0, labels[0] != IGNORE_INDEX] = IGNORE_INDEX  # row 0 supervises nothing
    with pytest.raises(ValueError, match="at least 6 action positions"):
        model(**{**batch, "labels": labels})


@pytest.mark.parametrize("head", ["l1", "diffusion"])
def test_predict_action_returns_the_unnormalized_chunk(rgb_image, head):
    stats = {"action": {"q01": [-2.0] * A, "q99": [2.0] * A, "mask": [True] * (A - 1) + [False]},
             "proprio": {"q01": [-1.0] * Q, "q99": [3.0] * Q, "min": [-1.0] * Q, "max": [3.0] * Q}}
    model = _oft(head=head).eval()
    model.norm_stats = {"demo": stats}
    second = rgb_image.transpose(0)
    actions = model.predict_action([rgb_image, second], "pick up the cup", proprio=np.ones(Q), num_inference_steps=3)
    assert actions.shape == (H, A) and actions.dtype == np.float64
    ids = torch.tensor([vla_prompt_prefix_ids(model.llm_backbone.prompt_builder_fn, model.llm_backbone.get_tokenizer(),
                                              "pick up the cup")])
    cameras = [batch_pixels(model, image) for image in (rgb_image, second)]
    normalized = model.predict_action_chunk(ids, None, cameras, torch.full((1, Q), 0.0), num_inference_steps=3,
                                            generator=torch.Generator().manual_seed(0))[0].numpy()
    expected = np.where(stats["action"]["mask"], (normalized + 1) * 2.0 - 2.0, normalized)
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)  # proprio 1 normalizes to 0
    with pytest.raises(ValueError, match="pass proprio="):
        model.predict_action([rgb_image], "pick up the cup")
