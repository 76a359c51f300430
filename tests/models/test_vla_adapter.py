"""VLA-Adapter's model: Bridge-Attention blocks against upstream's explicit formula (RoPE included), the gate, the
ActionQuery input replacement, the per-layer feature gathering, the layer each block reads, and the query noise."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import batch_pixels, build_tiny
from vla_train.config.policy import VLAAdapterPolicyConfig
from vla_train.models.vla_adapter.bridge import (
    BridgeActionHead,
    BridgeAttentionBlock,
    BridgeAttentionBlockPro,
    apply_rope,
)
from vla_train.models.vla_adapter.model import VLAAdapterVLM
from vla_train.models.vla_prompt import vla_training_ids

D, HEADS, H, A, N, P = 32, 4, 3, 2, 5, 6
MODEL_ID = "tiny-dinosiglip+tiny-qwen25"


def reference_rope(x: torch.Tensor) -> torch.Tensor:
    """Upstream's RoPE element by element: pair (2i, 2i+1) rotated, dimension j using frequency index j mod d/2."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    for t in range(x.shape[-2]):
        for j in range(d):
            angle = t * 10_000.0 ** (-2 * (j % (d // 2)) / d)
            partner = -x[..., t, j + 1] if j % 2 == 0 else x[..., t, j - 1]
            out[..., t, j] = x[..., t, j] * math.cos(angle) + partner * math.sin(angle)
    return out


def reference_block(block, x, h_a, h_t, p, pro: bool) -> torch.Tensor:
    """Upstream's forward: explicit scores, the gate multiplying the raw-feature scores, one softmax."""
    def heads(t):
        return t.view(t.shape[0], t.shape[1], block.num_heads, block.head_dim).transpose(1, 2)

    adapter = torch.cat([h_a, p], dim=1)
    q = heads(block.q_proj(x))
    if pro:
        q = reference_rope(q)
        k = [reference_rope(heads(block.k_self(x))), reference_rope(heads(block.k_adapter(adapter))),
             reference_rope(heads(block.k_task(h_t)))]
        v = [heads(block.v_self(x)), heads(block.v_adapter(adapter)), heads(block.v_task(h_t))]
    else:
        k = [heads(block.k_proj(s)) for s in (x, adapter, h_t)]
        v = [heads(block.v_proj(s)) for s in (x, adapter, h_t)]
    gate = torch.tanh(block.gating_factor)
    scores = torch.cat([q @ k[0].transpose(-2, -1), q @ k[1].transpose(-2, -1),
                        (q @ k[2].transpose(-2, -1)) * gate], dim=-1) / math.sqrt(block.head_dim)
    out = torch.softmax(scores, dim=-1) @ torch.cat(v, dim=2)
    out = block.o_proj(out.transpose(1, 2).reshape(x.shape))
    return block.ffn(out + x)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, D, generator=g) for n in (H, N, P, 1)]


@pytest.mark.parametrize("pro", [True, False], ids=["pro", "original"])
def test_bridge_block_equals_upstreams_explicit_formula(pro):
    block = (BridgeAttentionBlockPro if pro else BridgeAttentionBlock)(D, HEADS).double()
    with torch.no_grad():
        block.gating_factor.fill_(0.7)
    x, h_a, h_t, p = (t.double() for t in _inputs())
    torch.testing.assert_close(block(x, h_a=h_a, h_t=h_t, p=p), reference_block(block, x, h_a, h_t, p, pro))


def test_rope_matches_the_elementwise_reference_and_leaves_position_zero_alone():
    x = torch.randn(2, HEADS, 7, 8, dtype=torch.float64)
    rotated = apply_rope(x)
    torch.testing.assert_close(rotated, reference_rope(x))
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :])  # position 0: no rotation
    assert not torch.allclose(rotated[..., 3, :], x[..., 3, :])


def test_a_zero_gate_makes_the_raw_feature_scores_content_free():
    """tanh(0) = 0: every raw-feature key scores 0, so the attention weights do not depend on `h_t`; `h_t` then
    reaches the output only through its values (zero them and the output ignores the raw features exactly). Any
    other gate lets `h_t` steer the weights."""
    block = BridgeAttentionBlockPro(D, HEADS)
    with torch.no_grad():
        block.v_task.weight.zero_()
        block.v_task.bias.zero_()
    x, h_a, h_t, p = _inputs()
    other = torch.randn_like(h_t) * 5
    torch.testing.assert_close(block(x, h_a, h_t, p), block(x, h_a, other, p), rtol=0, atol=0)
    with torch.no_grad():
        block.gating_factor.fill_(0.5)
    assert not torch.allclose(block(x, h_a, h_t, p), block(x, h_a, other, p))


def test_block_i_reads_layer_i_plus_one_and_the_query_noise_is_training_only():
    head = BridgeActionHead(D, A, H, num_blocks=2, num_heads=HEADS).eval()
    task = [torch.randn(2, P, D) for _ in range(3)]
    queries = [torch.randn(2, N, D) for _ in range(3)]
    proprio = torch.randn(2, 1, D)
    base = head.predict_action(task, queries, proprio)
    assert base.shape == (2, H, A)
    changed = head.predict_action([torch.randn_like(task[0]), *task[1:]], [torch.randn_like(queries[0]), *queries[1:]],
                                  proprio)
    torch.testing.assert_close(changed, base, rtol=0, atol=0)  # layer 0 (embeddings) is read by no block
    assert not torch.allclose(head.predict_action(task, [queries[0], queries[1], -queries[2]], proprio), base)
    noisy = head.predict_action(task, queries, proprio, torch.Generator().manual_seed(1))
    again = head.predict_action(task, queries, proprio, torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, base) and torch.equal(noisy, again)
    with pytest.raises(ValueError, match="reads layers 1..2"):
        head.predict_action(task[:2], queries[:2], proprio)


def test_the_training_query_input_is_one_shared_draw_of_std_0_02():
    head = BridgeActionHead(64, A, H, num_blocks=1, num_heads=HEADS)
    x = head.query_input(3, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    assert x.shape == (3, H, A * 64)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # one [H, A*D] draw broadcast over the batch
    assert abs(x[0].mean().item()) < 0.005 and abs(x[0].std().item() - 0.02) < 0.002
    assert not head.query_input(2, torch.device("cpu"), torch.float32).any()  # evaluation: zeros


def test_head_keys_are_upstreams():
    keys = set(BridgeActionHead(D, A, H, num_blocks=1, num_heads=HEADS).state_dict())
    block = {k.removeprefix("model.mlp_resnet_blocks.0.") for k in keys if k.startswith("model.mlp_resnet_blocks.0.")}
    assert block == {f"{name}.{part}" for name in ("q_proj", "k_self", "v_self", "k_adapter", "v_adapter", "k_task",
                                                   "v_task", "o_proj", "ffn.0", "ffn.1") for part in ("weight", "bias")
                     } | {"gating_factor"}
    assert {"model.layer_norm1.weight", "model.fc1.weight", "model.layer_norm2.bias", "model.fc2.weight"} <= keys


# --- the model ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> VLAAdapterVLM:
    torch.manual_seed(0)
    config = VLAAdapterPolicyConfig(chunk_length=H, action_dim=A, proprio_dim=4, num_action_queries=N)
    model = config.build_model(build_tiny(MODEL_ID, vla=True)).eval()
    with torch.no_grad():
        model.action_queries.weight.normal_()  # distinguishable queries (they start at zero)
    return model


def _batch(model, rgb_image, instructions=("pick up the cup", "open the top drawer of the cabinet")):
    tokenizer = model.llm_backbone.get_tokenizer()
    rows = [vla_training_ids(model.llm_backbone.prompt_builder_fn, tokenizer, text, [model.placeholder_id] * N,
                             append_stop=False) for text in instructions]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, :len(ids)], labels[b, :len(lab)], mask[b, :len(ids)] = torch.tensor(ids), torch.tensor(lab), True
    pixels = batch_pixels(model, rgb_image)
    pixels = {k: v.expand(len(rows), -1, -1, -1) for k, v in pixels.items()}
    return input_ids, mask, labels, pixels


def test_action_queries_replace_the_placeholder_embeddings_in_order(model, rgb_image):
    input_ids, mask, labels, pixels = _batch(model, rgb_image)
    captured = {}
    handle = model.llm_backbone.llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        model.predict_action_chunk(input_ids, mask, pixels, torch.zeros(2, 4), labels=labels)
    finally:
        handle.remove()
    fused, patches = captured["inputs_embeds"], model.num_patches
    tokens = model.llm_backbone.embed_input_ids(input_ids)
    for b in range(2):
        slots = (labels[b] != -100).nonzero().flatten()
        assert len(slots) == N
        torch.testing.assert_close(fused[b, slots + patches], model.action_queries.weight)  # in order, row by row
        prompt = torch.arange(1, int(slots[0]))
        torch.testing.assert_close(fused[b, prompt + patches], tokens[b, prompt])
        torch.testing.assert_close(fused[b, 0], tokens[b, 0])  # the first token, then the patches


def test_layer_features_gather_every_layer_as_upstream_slices_them(model, rgb_image):
    input_ids, mask, labels, pixels = _batch(model, rgb_image)
    patches = model.patch_embeddings(pixels)
    slots = model.action_slot_mask(labels)
    task, states = model.layer_features(input_ids, mask, patches, slots)
    layers = model.llm_backbone.llm.config.num_hidden_layers
    assert len(task) == len(states) == layers + 1 == model.num_policy_blocks + 1
    captured = {}
    handle = model.llm_backbone.llm.model.register_forward_hook(
        lambda module, args, kwargs, output: captured.update(output=output, kwargs=kwargs), with_kwargs=True)
    try:
        model.layer_features(input_ids, mask, patches, slots)
    finally:
        handle.remove()
    hidden, cp = captured["output"].hidden_states, patches.shape[1]
    torch.testing.assert_close(hidden[-1], captured["output"].last_hidden_state)  # after the final norm
    for layer in range(layers + 1):
        torch.testing.assert_close(task[layer], hidden[layer][:, :cp])  # first token + the first C*P - 1 patches
        for b in range(2):
            positions = (labels[b] != -100).nonzero().flatten() + cp - 1  # one before each placeholder
            torch.testing.assert_close(states[layer][b], hidden[layer][b, positions])


def test_padding_does_not_change_a_rows_chunk(model, rgb_image):
    """Bidirectional attention over real tokens only: a row's prediction is the same alone or beside a longer one."""
    input_ids, mask, labels, pixels = _batch(model, rgb_image)
    proprio = torch.randn(2, 4)
    both = model.predict_action_chunk(input_ids, mask, pixels, proprio, labels=labels)
    alone = model.predict_action_chunk(input_ids[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())],
                                       {k: v[:1] for k, v in pixels.items()}, proprio[:1],
                                       labels=labels[:1, :int(mask[0].sum())])
    torch.testing.assert_close(alone[0], both[0], rtol=1e-4, atol=1e-5)
    prefix = [input_ids[b, :int(mask[b].sum()) - N] for b in range(2)]  # the prompts, placeholders appended here
    ids = torch.nn.utils.rnn.pad_sequence(prefix, batch_first=True, padding_value=model.placeholder_id)
    prompt_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p), dtype=torch.bool) for p in prefix],
                                                  batch_first=True)
    torch.testing.assert_close(model.predict_action_chunk(ids, prompt_mask, pixels, proprio), both)


def test_the_training_loss_is_l1_over_valid_steps_and_the_queries_get_gradients(model, rgb_image):
    input_ids, mask, labels, pixels = _batch(model, rgb_image)
    actions, valid = torch.randn(2, H, A), torch.tensor([[True, True, True], [True, False, False]])
    proprio = torch.randn(2, 4)
    model.train()
    try:
        out = model(input_ids, mask, pixels, labels, actions, valid, proprio, generator=torch.Generator().manual_seed(0))
        expected = (out.predicted_actions - actions).abs()[valid].sum() / (4 * A)
        torch.testing.assert_close(out.loss, expected)
        assert out.count.item() == 4 * A
        out.loss.backward()
        assert model.action_queries.weight.grad.abs().sum() > 0
        assert model.action_head.model.mlp_resnet_blocks[0].gating_factor.grad is not None
    finally:
        model.zero_grad()
        model.eval()


def test_meta_built_model_gets_its_initial_state_from_added_state():
    config = VLAAdapterPolicyConfig(chunk_length=H, action_dim=A, proprio_dim=4, num_action_queries=N)
    cpu = config.build_model(build_tiny(MODEL_ID, vla=True))
    added = cpu.added_state()
    state = cpu.state_dict()
    for key in ("action_queries.weight", "action_head.model.fc1.weight", "proprio_projector.fc2.bias",
                "action_head.model.mlp_resnet_blocks.1.k_task.weight"):
        assert torch.equal(added[key], state[key]), key
    assert not np.any(added["action_queries.weight"].numpy())
    assert set(cpu.always_trainable()) >= {cpu.action_queries.weight}


def test_inference_query_noise_feeds_the_training_distribution(model, rgb_image):
    """Upstream predicts from zeros (LayerNorm -> its bias, never seen in training); `inference_query_noise` draws the
    training noise once from the call's generator: seeded, hence reproducible."""
    input_ids, mask, labels, pixels = _batch(model, rgb_image)
    proprio = torch.randn(2, 4)
    zeros = model.predict_action_chunk(input_ids, mask, pixels, proprio, labels=labels)
    model.inference_query_noise = True
    try:
        first = model.predict_action_chunk(input_ids, mask, pixels, proprio, labels=labels,
                                           generator=torch.Generator().manual_seed(3))
        again = model.predict_action_chunk(input_ids, mask, pixels, proprio, labels=labels,
                                           generator=torch.Generator().manual_seed(3))
        default = model.predict_action_chunk(input_ids, mask, pixels, proprio, labels=labels)
    finally:
        model.inference_query_noise = False
    assert torch.equal(first, again) and not torch.allclose(first, zeros) and not torch.allclose(default, zeros)
    config = VLAAdapterPolicyConfig(chunk_length=H, action_dim=A, num_action_queries=N, inference_query_noise=True)
    assert config.build_model(build_tiny(MODEL_ID, vla=True)).inference_query_noise
