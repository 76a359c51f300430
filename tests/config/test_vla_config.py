import dataclasses
from dataclasses import dataclass, field

import draccus
import pytest

from vla_train.config.train import TrainConfig, with_recipe_policy
from vla_train.config.vla import TRAIN_STRATEGIES, TinyTest, VLAConfig, get_vla_config, resolve_train_strategy

# Facts §2.2, written out independently: vla_id -> (base_vlm, frz_vis, frz_llm, unfrz_last, data_mix, ews, gbs,
# pdbs, stage).
S, P = "siglip-224px+7b", "prism-dinosiglip-224px+7b"
REFERENCE = {
    "siglip-224px+mx-bridge": (S, False, False, False, "bridge", 8, 256, 32, "vla-full-train"),
    "prism-dinosiglip-224px+mx-bridge": (P, False, False, False, "bridge", 8, 256, 32, "vla-full-train"),
    "siglip-224px-icy+mx-bridge": (S, True, False, False, "bridge", 8, 256, 32, "vla-train"),
    "siglip-224px+mx-oxe-magic-soup": (S, False, False, False, "oxe_magic_soup", 64, 2048, 32, "vla-full-train"),
    "prism-dinosiglip-224px+mx-oxe-magic-soup-plus": (P, False, False, False, "oxe_magic_soup_plus_minus", 64, 2048,
                                                      32, "vla-full-train"),
    "siglip-224px+mx-tdroid_carrot_in_bowl": (S, False, False, False, "tdroid_carrot_in_bowl", 8, 256, 32,
                                              "vla-full-train"),
    "siglip-224px+mx-tdroid_pour_corn_in_pot": (S, False, False, False, "tdroid_pour_corn_in_pot", 8, 256, 32,
                                                "vla-full-train"),
    "siglip-224px-icy+mx-tdroid_carrot_in_bowl": (S, True, False, False, "tdroid_carrot_in_bowl", 8, 256, 32,
                                                  "vla-train"),
    "siglip-224px-last_layer+mx-tdroid_carrot_in_bowl": (S, True, True, True, "tdroid_carrot_in_bowl", 8, 256, 32,
                                                         "vla-last-layer-train"),
    "siglip-224px-sandwich+mx-tdroid_carrot_in_bowl": (S, False, True, True, "tdroid_carrot_in_bowl", 8, 256, 32,
                                                       "vla-sandwich-train"),
    "siglip-224px+mx-droid_wipe": (S, False, False, False, "droid_wipe", 8, 256, 32, "vla-full-train"),
}
COMMON = dict(shuffle_buffer_size=256_000, epochs=1000, max_steps=None, learning_rate=2e-5, weight_decay=0.0,
              max_grad_norm=1.0, lr_scheduler_type="constant", warmup_ratio=0.0, train_strategy="fsdp-full-shard",
              enable_gradient_checkpointing=True, enable_mixed_precision_training=True, reduce_in_full_precision=True,
              checkpoint_vision_blocks=False)


def test_registry_holds_reference_and_tiny_entries():
    assert set(VLAConfig.get_known_choices()) == {*REFERENCE, "tiny-demo", "tiny-test", *OFT_RECIPES,
                                                  "tiny-oft-l1", "tiny-oft-diffusion", "tiny-oft-demo",
                                                  "metaworld-oft-tiny", "metaworld-oft-tiny-b7", *VLA_ADAPTER_RECIPES,
                                                  "metaworld-vla-adapter-tiny-b7",
                                                  "tiny-vla-adapter", "pi0-libero", "pi0-libero-lora", "tiny-pi0",
                                                  "metaworld-pi0-tiny-b7"}


OFT_RECIPES = {"oft-libero-spatial": "libero_spatial_no_noops", "oft-libero-object": "libero_object_no_noops",
               "oft-libero-goal": "libero_goal_no_noops", "oft-libero-10": "libero_10_no_noops", "oft-aloha": "aloha"}


@pytest.mark.parametrize("vla_id", sorted(OFT_RECIPES))
def test_oft_recipes_carry_ofts_hyperparameters(vla_id):
    cfg = get_vla_config(vla_id)
    cfg.validate(8)
    assert cfg.data_mix == OFT_RECIPES[vla_id] and cfg.policy.family == "oft"
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.expected_world_size, cfg.per_device_batch_size,
            cfg.global_batch_size) == (5e-4, "step-decay", 8, 8, 64)
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (True, 32, 16, "all-linear")
    aloha = vla_id == "oft-aloha"
    assert (cfg.max_steps, cfg.lr_decay_steps) == ((100_000, 50_000) if aloha else (150_000, 100_000))
    assert (cfg.policy.chunk_length, cfg.policy.action_dim, cfg.policy.proprio_dim, cfg.policy.film,
            len(cfg.policy.cameras)) == ((25, 14, 14, True, 3) if aloha else (8, 7, 8, False, 2))


VLA_ADAPTER_RECIPES = {"vla-adapter-libero-spatial": "libero_spatial_no_noops",
                       "vla-adapter-libero-object": "libero_object_no_noops",
                       "vla-adapter-libero-goal": "libero_goal_no_noops", "vla-adapter-libero-10": "libero_10_no_noops",
                       "vla-adapter-calvin": "calvin_abc"}


@pytest.mark.parametrize("vla_id", sorted(VLA_ADAPTER_RECIPES))
def test_vla_adapter_recipes_carry_its_hyperparameters(vla_id):
    cfg = get_vla_config(vla_id)
    cfg.validate(4)
    assert cfg.data_mix == VLA_ADAPTER_RECIPES[vla_id] and cfg.policy.family == "vla-adapter"
    assert cfg.base_vlm == "prism-qwen25-extra-dinosiglip-224px+0_5b"
    assert (cfg.learning_rate, cfg.expected_world_size, cfg.per_device_batch_size, cfg.global_batch_size,
            cfg.max_steps) == (5e-4, 4, 16, 64, 100_000)
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (True, 64, 128, "all-linear")
    policy = cfg.policy
    assert (policy.chunk_length, policy.action_dim, policy.proprio_dim, policy.cameras, policy.num_action_queries,
            policy.block, policy.num_heads) == (8, 7, 8, ["primary", "wrist"], 64, "pro", 8)


def test_the_pi0_recipe_carries_openpis_libero_setup():
    cfg = get_vla_config("pi0-libero")
    cfg.validate(8)
    assert (cfg.base_vlm, cfg.data_mix, cfg.policy.family) == ("pi0-paligemma-224px",
                                                              "libero_4_task_suites_no_noops", "pi0")
    assert (cfg.global_batch_size, cfg.max_steps, cfg.learning_rate, cfg.max_grad_norm) == (32, 30_000, 2.5e-5, 1.0)
    assert not (cfg.freeze_vision_backbone or cfg.freeze_llm_backbone or cfg.lora.enabled)  # full fine-tuning
    assert (cfg.adam_betas, cfg.adam_eps, cfg.weight_decay) == ((0.9, 0.95), 1e-8, 1e-10)
    assert (cfg.lr_scheduler_type, cfg.warmup_steps, cfg.min_learning_rate, cfg.ema_decay) == (
        "warmup-steps+cosine-to-min", 1_000, 2.5e-6, 0.99)
    policy = cfg.policy
    assert (policy.chunk_length, policy.action_dim, policy.proprio_dim, policy.cameras, policy.max_token_len,
            policy.expert, policy.num_inference_steps) == (50, 7, 8, ["primary", "wrist"], 48, "gemma-300m", 10)


def test_the_pi0_lora_recipe_carries_openpis_lora_variants():
    cfg = get_vla_config("pi0-libero-lora")
    cfg.validate(8)
    lora = cfg.lora
    assert (lora.enabled, lora.rank, lora.alpha, lora.modules, lora.full_modules, lora.rank_pattern) == (
        True, 16, 16, ["llm_backbone"], ["vision_backbone", "projector"], {r"expert\..*": 32})
    assert lora.alpha_pattern() == {r"expert\..*": 32.0} and cfg.ema_decay is None
    lora.full_modules = ["llm_backbone"]
    with pytest.raises(ValueError, match="\\['llm_backbone'\\] are in both modules"):
        cfg.validate(8)
    lora.full_modules, lora.rank_pattern = [], {"expert": 0}
    with pytest.raises(ValueError, match="rank_pattern\\['expert'\\] = 0 must be an integer >= 1"):
        cfg.validate(8)


def test_vla_adapter_policy_options_are_validated():
    args = with_recipe_policy(["--vla.type", "tiny-vla-adapter", "--vla.policy.block", "original"])
    policy = draccus.parse(TrainConfig, args=args).vla.policy
    assert (policy.family, policy.block, policy.num_action_queries, policy.proprio_dim) == ("vla-adapter", "original",
                                                                                             16, 9)
    cfg = get_vla_config("tiny-vla-adapter")
    cfg.policy.block = "fancy"
    with pytest.raises(ValueError, match="--vla.policy.block 'fancy'"):
        cfg.validate(2)
    cfg.policy.block, cfg.policy.num_action_queries = "pro", 0
    with pytest.raises(ValueError, match="num_action_queries = 0 must be an integer >= 1"):
        cfg.validate(2)


def test_policy_options_on_the_command_line_keep_the_recipes_other_options():
    args = with_recipe_policy(["--vla.type", "tiny-oft-diffusion", "--vla.policy.film", "true"])
    policy = draccus.parse(TrainConfig, args=args).vla.policy
    assert (policy.head, policy.film, policy.chunk_length, policy.proprio_dim) == ("diffusion", True, 4, 9)
    explicit = with_recipe_policy(["--vla.type=tiny-oft-l1", "--vla.policy.type", "oft", "--vla.policy.head",
                                   "diffusion"])
    assert draccus.parse(TrainConfig, args=explicit).vla.policy.proprio_dim == 9
    other_family = ["--vla.type", "tiny-oft-l1", "--vla.policy.type", "openvla"]
    assert with_recipe_policy(other_family) == other_family
    assert with_recipe_policy(["--vla.type", "tiny-test"]) == ["--vla.type", "tiny-test"]
    with pytest.raises(ValueError, match="lr_decay_steps"):
        cfg = get_vla_config("tiny-oft-l1")
        cfg.lr_decay_steps = None
        cfg.validate(2)


@pytest.mark.parametrize("vla_id", sorted(REFERENCE))
def test_reference_entries_match_facts(vla_id):
    base_vlm, frz_vis, frz_llm, unfrz_last, data_mix, ews, gbs, pdbs, stage = REFERENCE[vla_id]
    cfg = get_vla_config(vla_id)
    assert (cfg.vla_id, cfg.base_vlm, cfg.freeze_vision_backbone, cfg.freeze_llm_backbone,
            cfg.unfreeze_last_llm_layer, cfg.data_mix, cfg.expected_world_size, cfg.global_batch_size,
            cfg.per_device_batch_size) == (vla_id, base_vlm, frz_vis, frz_llm, unfrz_last, data_mix, ews, gbs, pdbs)
    assert {name: getattr(cfg, name) for name in COMMON} == COMMON
    assert cfg.stage() == stage
    assert cfg.normalized_train_strategy() == "full-shard"
    # on its 8-GPU nodes, as the reference ran it: hybrid sharding once the recipe spans several nodes
    assert cfg.normalized_train_strategy(num_nodes=ews // 8) == ("hybrid-shard" if ews > 8 else "full-shard")
    assert cfg.grad_accumulation_steps(ews) == 1
    cfg.validate(ews)


def test_tiny_entries():
    demo = get_vla_config("tiny-demo")
    assert dataclasses.asdict(demo) == dict(
        vla_id="tiny-demo", base_vlm="runs/base-vlms/tiny-dinosiglip+tiny-llama", freeze_vision_backbone=False,
        freeze_llm_backbone=False, unfreeze_last_llm_layer=False, data_mix="demo", shuffle_buffer_size=2000,
        epochs=1000, max_steps=300, expected_world_size=2, global_batch_size=16, per_device_batch_size=8,
        learning_rate=2e-3, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear-warmup+cosine-decay",
        warmup_ratio=0.05, train_strategy="full-shard", enable_gradient_checkpointing=True,
        enable_mixed_precision_training=True, reduce_in_full_precision=True, checkpoint_vision_blocks=False,
        policy=dict(predict_stop_token=True), lr_decay_steps=None, adam_betas=(0.9, 0.999), adam_eps=1e-8,
        warmup_steps=None, min_learning_rate=None, ema_decay=None,
        lora=dict(enabled=False, rank=32, alpha=16, dropout=0.0, targets="all-linear", init="gaussian",
                      modules=["vision_backbone", "projector", "llm_backbone"], full_modules=[], rank_pattern={}))
    assert demo.policy.family == "openvla"
    test = get_vla_config("tiny-test")
    assert (test.base_vlm, test.data_mix, test.shuffle_buffer_size, test.epochs, test.max_steps,
            test.expected_world_size, test.global_batch_size, test.per_device_batch_size, test.learning_rate,
            test.weight_decay, test.max_grad_norm, test.lr_scheduler_type, test.warmup_ratio,
            test.train_strategy) == ("tiny-dinosiglip+tiny-llama", "demo", 64, 1000, 6, 2, 4, 2, 1e-3, 0.01, 1.0,
                                     "constant", 0.0, "full-shard")
    for cfg in (demo, test):
        cfg.validate(2)
        assert cfg.stage() == "vla-full-train"


def test_grad_accumulation():
    cfg = dataclasses.replace(TinyTest(), global_batch_size=16)
    assert cfg.grad_accumulation_steps(2) == 4
    assert cfg.grad_accumulation_steps(1) == 8
    cfg.validate(2)
    with pytest.raises(ValueError, match=r"global_batch_size = 16 is not a positive multiple of per_device_batch_"
                                         r"size \* world_size = 2 \* 3 = 6.*Fix: pass --vla.global_batch_size"):
        cfg.grad_accumulation_steps(3)


@pytest.mark.parametrize(("name", "one_node", "two_nodes"), [
    ("full-shard", "full-shard", "full-shard"),
    ("shard-grad-op", "shard-grad-op", "shard-grad-op"),
    ("hybrid-shard", "hybrid-shard", "hybrid-shard"),
    ("hybrid-shard-grad-op", "hybrid-shard-grad-op", "hybrid-shard-grad-op"),
    # the reference's ids: the sharding the reference ran (hybrid; on one node that is full sharding)
    ("fsdp-full-shard", "full-shard", "hybrid-shard"),
    ("fsdp-shard-grad-op", "shard-grad-op", "hybrid-shard-grad-op"),
])
def test_strategies_and_aliases_resolve_per_node_count(name, one_node, two_nodes):
    cfg = dataclasses.replace(TinyTest(), train_strategy=name)
    assert cfg.normalized_train_strategy() == resolve_train_strategy(name, 1) == one_node
    assert cfg.normalized_train_strategy(num_nodes=2) == resolve_train_strategy(name, 2) == two_nodes
    assert resolve_train_strategy(name, 8) == two_nodes
    assert {one_node, two_nodes} <= set(TRAIN_STRATEGIES)
    cfg.validate(2)


def test_node_count_must_be_positive():
    with pytest.raises(ValueError, match=r"num_nodes = 0 must be positive"):
        resolve_train_strategy("fsdp-full-shard", 0)


@pytest.mark.parametrize("changes, world_size, message", [
    ({}, 4, r"Expected World Size = 2 but Found 4 GPUs.*--vla.type.*--vla.expected_world_size 4"),
    ({"global_batch_size": 6}, 2, r"global_batch_size = 6 is not a positive multiple .* = 4"),
    ({"global_batch_size": 0}, 2, r"global_batch_size = 0 must be positive\. Fix: pass --vla.global_batch_size"),
    ({"per_device_batch_size": -1}, 2, r"per_device_batch_size = -1 must be positive"),
    ({"shuffle_buffer_size": 0}, 2, r"shuffle_buffer_size = 0 must be positive"),
    ({"epochs": 0}, 2, r"epochs = 0 must be positive"),
    ({"max_steps": 0}, 2, r"max_steps = 0 must be positive\. Fix: pass --vla.max_steps"),
    ({"learning_rate": 0.0}, 2, r"learning_rate = 0.0 must be a finite positive number"),
    ({"learning_rate": float("inf")}, 2, r"learning_rate = inf must be a finite positive number"),
    ({"learning_rate": float("nan")}, 2, r"learning_rate = nan must be a finite positive number"),
    ({"weight_decay": -0.1}, 2, r"weight_decay = -0.1 must be a finite non-negative number"),
    ({"weight_decay": float("inf")}, 2, r"weight_decay = inf must be a finite non-negative number"),
    ({"max_grad_norm": 0.0}, 2, r"max_grad_norm = 0.0 must be a finite positive number"),
    ({"max_grad_norm": float("inf")}, 2, r"max_grad_norm = inf must be a finite positive number"),
    ({"lr_scheduler_type": "cosine"}, 2, r"Unknown lr_scheduler_type 'cosine'\. Fix: pass --vla.lr_scheduler_type "
                                         r"one of \['constant', 'linear-warmup\+cosine-decay', 'step-decay', "
                                         r"'warmup-steps\+cosine-to-min'\]"),
    ({"warmup_ratio": 1.0}, 2, r"warmup_ratio = 1.0 is outside \[0, 1\)\. Fix"),
    ({"adam_betas": (0.9, 1.0)}, 2, r"adam_betas = \(0.9, 1.0\) must be two numbers in \[0, 1\)\. Fix: pass "
                                    r"--vla.adam_betas"),
    ({"adam_betas": (-0.1, 0.95)}, 2, r"adam_betas = \(-0.1, 0.95\) must be two numbers in \[0, 1\)"),
    ({"adam_betas": (0.9,)}, 2, r"adam_betas = \(0.9,\) must be two numbers"),
    ({"adam_eps": 0.0}, 2, r"adam_eps = 0.0 must be a finite positive number\. Fix: pass --vla.adam_eps > 0"),
    ({"lr_scheduler_type": "warmup-steps+cosine-to-min"}, 2, r"needs warmup_steps and min_learning_rate\. Fix: pass "
                                                             r"--vla.warmup_steps N and --vla.min_learning_rate"),
    ({"lr_scheduler_type": "warmup-steps+cosine-to-min", "warmup_steps": 6, "min_learning_rate": 0.0}, 2,
     r"warmup_steps = 6 is outside \[0, max_steps = 6\)\. Fix: pass --vla.warmup_steps"),
    ({"lr_scheduler_type": "warmup-steps+cosine-to-min", "warmup_steps": -1, "min_learning_rate": 0.0}, 2,
     r"warmup_steps = -1 is outside"),
    ({"lr_scheduler_type": "warmup-steps+cosine-to-min", "warmup_steps": 2, "min_learning_rate": 2e-3}, 2,
     r"min_learning_rate = 0.002 is outside \[0, learning_rate = 0.001\]\. Fix: pass --vla.min_learning_rate"),
    ({"lr_scheduler_type": "warmup-steps+cosine-to-min", "warmup_steps": 2, "min_learning_rate": -1e-5}, 2,
     r"min_learning_rate = -1e-05 is outside"),
    ({"warmup_steps": 2}, 2, r"--vla.warmup_steps only apply to --vla.lr_scheduler_type warmup-steps\+cosine-to-min "
                             r"\(this run: constant\)"),
    ({"min_learning_rate": 0.0}, 2, r"--vla.min_learning_rate only apply to"),
    ({"ema_decay": 1.0}, 2, r"ema_decay = 1.0 is outside \(0, 1\)\. Fix: pass --vla.ema_decay in \(0, 1\)"),
    ({"ema_decay": 0.0}, 2, r"ema_decay = 0.0 is outside \(0, 1\)"),
    ({"ema_decay": float("nan")}, 2, r"ema_decay = nan is outside \(0, 1\)"),
    ({"warmup_ratio": -0.1}, 2, r"warmup_ratio = -0.1 is outside \[0, 1\)"),
    ({"train_strategy": "ddp"}, 2, r"Unknown train_strategy 'ddp'\. Fix: pass --vla.train_strategy one of "
                                   r"\['full-shard', 'shard-grad-op', 'hybrid-shard', 'hybrid-shard-grad-op', "
                                   r"'fsdp-full-shard', 'fsdp-shard-grad-op'\]\."),
    ({"freeze_llm_backbone": True}, 2, r"freeze_llm_backbone=True needs unfreeze_last_llm_layer=True"),
    ({"unfreeze_last_llm_layer": True}, 2, r"unfreeze_last_llm_layer=True only makes sense"),
])
def test_validation_errors(changes, world_size, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TinyTest(), **changes).validate(world_size)


def test_optimizer_schedule_and_ema_options_parse_and_validate():
    args = ["--vla.type", "tiny-test", "--vla.adam_betas", "[0.9, 0.95]", "--vla.adam_eps", "1e-6",
            "--vla.lr_scheduler_type", "warmup-steps+cosine-to-min", "--vla.warmup_steps", "0",
            "--vla.min_learning_rate", "1e-3", "--vla.ema_decay", "0.99"]
    vla = draccus.parse(TrainConfig, args=args).vla
    assert (vla.adam_betas, vla.adam_eps, vla.warmup_steps, vla.min_learning_rate, vla.ema_decay) == \
        ((0.9, 0.95), 1e-6, 0, 1e-3, 0.99)
    vla.validate(2)  # warmup 0 and a floor equal to the peak are allowed
    dataclasses.replace(vla, max_steps=None, warmup_steps=10**6).validate(2)  # checked against the budget later


def test_path_base_vlm_is_stored_as_str(tmp_path):
    assert dataclasses.replace(TinyTest(), base_vlm=tmp_path).base_vlm == str(tmp_path)


def test_cli_selects_entry_and_overrides_fields():
    @dataclass
    class Wrapper:
        vla: VLAConfig = field(default_factory=TinyTest)

    cfg = draccus.parse(Wrapper, args=["--vla.type", "siglip-224px-icy+mx-bridge", "--vla.per_device_batch_size", "16",
                                       "--vla.base_vlm", "runs/my-base"])
    assert (cfg.vla.vla_id, cfg.vla.per_device_batch_size, cfg.vla.base_vlm) == (
        "siglip-224px-icy+mx-bridge", 16, "runs/my-base")
    assert cfg.vla.grad_accumulation_steps(8) == 2


def test_unknown_vla_id():
    with pytest.raises(ValueError, match="Unknown vla id 'openvla-13b'"):
        get_vla_config("openvla-13b")


def test_the_policy_is_chosen_on_the_command_line_and_old_configs_read_as_openvla(capsys):
    """`--vla.policy.type` selects the family; a config.json written before policies existed reads as `openvla`."""
    parsed = draccus.parse(TrainConfig, args=["--vla.type", "tiny-demo", "--vla.policy.type", "openvla",
                                              "--vla.policy.predict_stop_token", "false"])
    assert parsed.vla.policy.family == "openvla" and parsed.vla.policy.predict_stop_token is False
    encoded = draccus.encode(get_vla_config("tiny-demo"))
    assert encoded["policy"] == {"type": "openvla", "predict_stop_token": True}
    old = {key: value for key, value in encoded.items() if key != "policy"}
    decoded = draccus.decode(VLAConfig, {**old, "type": "tiny-demo"})
    assert decoded.policy == get_vla_config("tiny-demo").policy
    with pytest.raises(SystemExit):
        draccus.parse(TrainConfig, args=["--vla.type", "tiny-demo", "--vla.policy.type", "no-such-family"])
    assert "invalid choice: 'no-such-family' (choose from 'openvla'" in capsys.readouterr().err
