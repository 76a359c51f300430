import numpy as np
import pytest
import torch

from tests.conftest import NORM_STATS, TINY_MODEL_IDS, batch_pixels, build_tiny
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.openvla import unnormalize_actions
from vla_train.models.prompts import PurePromptBuilder, Qwen25ChatPromptBuilder
from vla_train.models.tokenizers import build_tiny_tokenizer
from vla_train.models.vla_prompt import IGNORE_INDEX, vla_prompt_prefix_ids, vla_training_ids

ACTION = np.array([0.25, -0.5, 0.75, 0.0, -1.0, 1.0, 0.3])


def test_training_ids_equal_the_reference_string_construction():
    tokenizer = build_tiny_tokenizer("llama")
    action_tokenizer = ActionTokenizer(tokenizer)
    # reference (facts §6.1): prompt string with the decoded action characters, re-tokenized, last A + 1 supervised
    builder = PurePromptBuilder("openvla")
    builder.add_turn("human", "What action should the robot take to pick up the cup?")
    builder.add_turn("gpt", action_tokenizer(ACTION))
    reference_ids = tokenizer(builder.get_prompt(), add_special_tokens=True).input_ids
    reference_labels = list(reference_ids)
    reference_labels[: -(len(ACTION) + 1)] = [IGNORE_INDEX] * (len(reference_ids) - len(ACTION) - 1)

    ids, labels = vla_training_ids(PurePromptBuilder, tokenizer, "Pick up the CUP",
                                   action_tokenizer.encode_to_ids(ACTION))
    assert ids == reference_ids and labels == reference_labels
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[-len(ACTION) - 2]) == "▁"  # the space before the actions (29871)

    _, no_stop = vla_training_ids(PurePromptBuilder, tokenizer, "pick up the cup",
                                  action_tokenizer.encode_to_ids(ACTION), predict_stop_token=False)
    assert no_stop[-1] == IGNORE_INDEX and no_stop[:-1] == labels[:-1]


def test_qwen_ids_end_with_im_end_and_prefix_is_the_inference_prompt():
    tokenizer = build_tiny_tokenizer("qwen")
    actions = list(range(256, 263))
    ids, labels = vla_training_ids(Qwen25ChatPromptBuilder, tokenizer, "wave", actions)
    prefix = vla_prompt_prefix_ids(Qwen25ChatPromptBuilder, tokenizer, "wave")
    assert ids[: len(prefix)] == prefix
    assert ids[len(prefix):] == [*actions, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert [label for label in labels if label != IGNORE_INDEX] == ids[len(prefix):]
    assert tokenizer.decode(prefix).endswith("<|im_start|>assistant\n")


def test_empty_instruction_is_rejected():
    with pytest.raises(ValueError, match="Empty language instruction"):
        vla_prompt_prefix_ids(PurePromptBuilder, build_tiny_tokenizer("llama"), "   ")


def test_unnormalize_matches_numpy_formula_and_respects_mask():
    stats = NORM_STATS["demo_dataset"]["action"]
    normalized = np.array([-1.0, 0.0, 1.0, 0.5, -0.5, 0.25, 0.996])
    low, high = np.array(stats["q01"]), np.array(stats["q99"])
    expected = 0.5 * (normalized + 1) * (high - low) + low
    expected[-1] = normalized[-1]  # gripper is masked out: stays in [-1, 1] bin-centre units
    np.testing.assert_allclose(unnormalize_actions(normalized, stats), expected, rtol=0, atol=1e-12)
    no_mask = {k: v for k, v in stats.items() if k != "mask"}
    np.testing.assert_allclose(unnormalize_actions(normalized, no_mask), 0.5 * (normalized + 1) * (high - low) + low)
    with pytest.raises(ValueError, match="3 dimensions but the statistics have 7"):
        unnormalize_actions(np.zeros(3), stats)


@pytest.mark.parametrize("model_id", TINY_MODEL_IDS)
def test_cached_greedy_decoding_equals_full_recompute(model_id, rgb_image):
    vlm = build_tiny(model_id, vla=True).eval()
    tokenizer = vlm.llm_backbone.get_tokenizer()
    ids = torch.tensor([vla_prompt_prefix_ids(vlm.llm_backbone.prompt_builder_fn, tokenizer, "open the drawer")])
    pixels = batch_pixels(vlm, rgb_image)
    generated = vlm.generate_action_token_ids(ids, pixels, 7)
    with torch.no_grad():
        running = ids
        for _ in range(7):
            logits = vlm(input_ids=running, pixel_values=pixels).logits
            running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == running[:, ids.shape[1]:].tolist()

    action = vlm.predict_action(rgb_image, "Open the drawer")
    decoded = vlm.action_tokenizer.decode_token_ids_to_actions(generated[0].numpy())
    np.testing.assert_allclose(action, unnormalize_actions(decoded, NORM_STATS["demo_dataset"]["action"]))


def test_unnorm_key_rules(rgb_image):
    vlm = build_tiny("tiny-siglip+tiny-llama", vla=True)
    assert vlm.get_action_dim() == 7 and vlm.get_action_dim("demo_dataset") == 7
    with pytest.raises(ValueError, match="unnorm_key='bridge_orig' is not among"):
        vlm.predict_action(rgb_image, "wave", unnorm_key="bridge_orig")
    vlm.norm_stats = {**NORM_STATS, "other": NORM_STATS["demo_dataset"]}
    with pytest.raises(ValueError, match="pass unnorm_key"):
        vlm.predict_action(rgb_image, "wave")


def test_a_trained_tiny_vla_predicts_its_action(rgb_image):
    """End to end: fit one (image, instruction, action) example, then predict_action returns that action."""
    torch.manual_seed(0)
    vlm = build_tiny("tiny-dinosiglip+tiny-llama", vla=True)
    stats = NORM_STATS["demo_dataset"]["action"]
    low, high = np.array(stats["q01"]), np.array(stats["q99"])
    target = np.array([0.1, -0.2, 0.3, 0.5, -1.5, 2.0, 1.0])  # robot units; gripper is not normalized
    normalized = np.where(stats["mask"], 2 * (target - low) / (high - low) - 1, target)
    ids, labels = vla_training_ids(vlm.llm_backbone.prompt_builder_fn, vlm.llm_backbone.get_tokenizer(),
                                   "stack the blocks", vlm.action_tokenizer.encode_to_ids(normalized))
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    pixels = batch_pixels(vlm, rgb_image)
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    vlm.train()
    for _ in range(150):
        loss = vlm(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), pixel_values=pixels,
                   labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    vlm.eval()
    predicted = vlm.predict_action(rgb_image, "Stack the blocks")
    bin_width = 2 / 255 * (high - low) / 2
    tolerance = np.where(stats["mask"], bin_width, 1 / 255) + 1e-9
    assert np.all(np.abs(predicted - target) <= tolerance), (predicted, target)
