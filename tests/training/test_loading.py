"""Meta-device loading (training/loading.py). On 2 gloo processes (strict collectives), the model built on the meta
device, sharded, then filled shard by shard from rank 0 equals the old path's (the full FP32 model on every rank, then
`parallelize_vlm`) exactly: full state dict (values and dtypes), local shards, every buffer (persistent or not),
`requires_grad`, and a forward's loss; for a base run directory (frozen-vision bf16 and full stages, full and hybrid
sharding), a `.pt` to fine-tune from, a checkpoint without vision weights and a tiny registry id. A missing or corrupt
checkpoint raises on every rank."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import build_tiny
from vla_train.config.model import get_model_config
from vla_train.models.build import build_vision_backbone, build_vlm
from vla_train.models.llm import LLM_BACKBONES, LLM_FAMILIES, LLMBackbone, shrink_architecture
from vla_train.models.run_dir import read_checkpoint, save_base_vlm
from vla_train.training import loading
from vla_train.training.distributed import free_port
from vla_train.training.loading import ModelSource, base_vlm_source, run_dir_source

MODEL_ID = "tiny-dinosiglip+tiny-qwen25"  # fused vision, tied input/output embeddings


def _perturbed(model_id: str, seed: int):
    """The tiny model with every weight moved off its seeded initialization (a silent re-init would show)."""
    vlm = build_tiny(model_id)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vlm.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return vlm


def _write_run_dirs(root: Path) -> dict[str, Path]:
    """A base run directory (with a second `.pt` to fine-tune from) and one whose checkpoint lacks vision weights."""
    model_cfg = get_model_config(MODEL_ID)
    base = root / "base"
    save_base_vlm(_perturbed(MODEL_ID, 1), model_cfg, base)
    tuned = base / "checkpoints" / "step-000010-epoch-00-loss=1.0000.pt"
    torch.save({"model": {k: getattr(_perturbed(MODEL_ID, 2), k).state_dict() for k in
                          ("vision_backbone", "projector", "llm_backbone")}}, tuned)
    no_vision = root / "no_vision"
    checkpoint = save_base_vlm(_perturbed(MODEL_ID, 3), model_cfg, no_vision)
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]["vision_backbone"]
    torch.save(state, checkpoint)
    return {"base": base, "tuned": tuned, "no_vision": no_vision}


def _spawn(fn, out: Path, *args, nodes: int = 1) -> list:
    """Run `fn(ctx, *args)` on `nodes` x 2 gloo processes; returns each rank's (JSON) result, rank 0 first."""
    mp.start_processes(_entry, args=(nodes, free_port(), fn, out, args), nprocs=2 * nodes, join=True,
                       start_method="spawn")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2 * nodes)]


def _entry(rank: int, nodes: int, port: int, fn, out: Path, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(2 * nodes), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
                      VLA_TRAIN_STRICT_COLLECTIVES="1", HF_HUB_OFFLINE="1")
    from vla_train.training.distributed import destroy_distributed, init_distributed

    ctx = init_distributed(timeout_minutes=2)
    try:
        result = fn(ctx, *args)
    finally:
        destroy_distributed()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _both_paths(ctx, source: ModelSource, old_loader, stage: str, strategy: str):
    from vla_train.models.freezing import freeze_backbones
    from vla_train.training.loading import build_meta_vlm, load_weights
    from vla_train.training.parallelize import parallelize_vlm

    new = build_meta_vlm(source)
    assert all(p.is_meta and p.dtype == torch.float32 for p in new.parameters())
    old = old_loader()
    for vlm in (new, old):
        freeze_backbones(vlm, stage)
        parallelize_vlm(vlm, ctx, strategy=strategy, stage=stage)
    load_weights(new, source, ctx)
    return new, old


def _loss(vlm) -> float:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (2, 8), generator=generator)
    size = vlm.vision_backbone.default_image_resolution
    pixels = {key: torch.randn(2, *size, generator=generator) for key in vlm.vision_backbone.keys}
    if not vlm.vision_backbone.is_fused:
        pixels = pixels[""]
    with torch.no_grad():
        return vlm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                   labels=input_ids).loss.item()


def _compare(new, old) -> dict:
    """What differs between the two models (empty lists when nothing does), and what was compared."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)
    got, expected = get_model_state_dict(new, options=options), get_model_state_dict(old, options=options)
    new_buffers, old_buffers = dict(new.named_buffers()), dict(old.named_buffers())
    new_params, old_params = dict(new.named_parameters()), dict(old.named_parameters())
    return {
        "keys": len(expected), "same_keys": list(got) == list(expected),
        "state_mismatch": [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k],
                                                                                                       expected[k])],
        "shard_mismatch": [k for k, p in old_params.items() if not torch.equal(new_params[k].to_local(), p.to_local())],
        "grad_mismatch": [k for k, p in old_params.items() if new_params[k].requires_grad != p.requires_grad],
        "buffers": sorted(old_buffers), "same_buffer_names": sorted(new_buffers) == sorted(old_buffers),
        "buffer_mismatch": [k for k, b in old_buffers.items() if not torch.equal(new_buffers[k], b)],
        "dtypes": sorted({str(v.dtype) for v in got.values()}),
        "tied": new.llm_backbone.llm.lm_head.weight is new.llm_backbone.llm.model.embed_tokens.weight,
        "loss": [_loss(new), _loss(old)],
    }


def _compare_cases(ctx, paths: dict[str, str]) -> dict:
    from vla_train.models.run_dir import load_base_vlm, load_run_dir
    from vla_train.training.distributed import broadcast_tensor

    base, tuned, no_vision = Path(paths["base"]), Path(paths["tuned"]), Path(paths["no_vision"])
    cases = {
        "base, vla-train": (base_vlm_source(base), lambda: load_base_vlm(base), "vla-train", "full-shard"),
        "base, vla-full-train, hybrid": (base_vlm_source(base), lambda: load_base_vlm(base), "vla-full-train",
                                         "hybrid-shard"),
        "pretrained .pt": (run_dir_source(base, tuned), lambda: load_run_dir(base, checkpoint=tuned), "vla-train",
                           "full-shard"),
        "no vision weights": (base_vlm_source(no_vision), lambda: load_base_vlm(no_vision), "vla-train",
                              "full-shard"),
        "registry id": (base_vlm_source("tiny-siglip+tiny-llama"), lambda: load_base_vlm("tiny-siglip+tiny-llama"),
                        "vla-full-train", "full-shard"),
    }
    results = {name: _compare(*_both_paths(ctx, *case)) for name, case in cases.items()}
    buffer = torch.arange(6.0).reshape(2, 3).t() + 10 * ctx.rank  # a non-contiguous buffer, as `_stream` sends one
    assert broadcast_tensor(buffer) is buffer
    return {**results, "broadcast": buffer.tolist()}


def test_meta_loading_equals_the_full_model_path_on_two_ranks(tmp_path):
    paths = {name: str(path) for name, path in _write_run_dirs(tmp_path).items()}
    results = _spawn(_compare_cases, tmp_path, paths)
    rotary = ["llm_backbone.llm.model.rotary_emb.inv_freq", "llm_backbone.llm.model.rotary_emb.original_inv_freq"]
    for rank_results in results:
        assert rank_results.pop("broadcast") == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]  # rank 0's values everywhere
        assert list(rank_results) == ["base, vla-train", "base, vla-full-train, hybrid", "pretrained .pt",
                                      "no vision weights", "registry id"]
        for name, result in rank_results.items():
            assert result["same_keys"] and result["same_buffer_names"], name
            assert result["state_mismatch"] == result["shard_mismatch"] == result["grad_mismatch"] == [], name
            assert result["buffers"] == rotary and result["buffer_mismatch"] == [], name
            assert result["loss"][0] == result["loss"][1], name
        assert rank_results["base, vla-train"]["keys"] == 136
        assert rank_results["base, vla-train"]["dtypes"] == ["torch.bfloat16", "torch.float32"]  # frozen vision bf16
        assert rank_results["base, vla-full-train, hybrid"]["dtypes"] == ["torch.float32"]
        assert rank_results["base, vla-train"]["tied"] and not rank_results["registry id"]["tied"]
    # the fine-tuning checkpoint's weights, not the base's
    assert results[0]["pretrained .pt"]["loss"] != results[0]["base, vla-train"]["loss"]


def _compare_hybrid(ctx, base: str) -> dict:
    from vla_train.models.run_dir import load_base_vlm

    new, old = _both_paths(ctx, base_vlm_source(base), lambda: load_base_vlm(base), "vla-train", "hybrid-shard")
    return {"mesh": list(next(new.parameters()).device_mesh.shape), **_compare(new, old)}


def test_hybrid_sharding_over_two_nodes_fills_every_replica(tmp_path):
    """2 nodes x 2 processes, a (replicate 2, shard 2) mesh: rank 0's weights reach the other node's shards too."""
    base = _write_run_dirs(tmp_path)["base"]
    for result in _spawn(_compare_hybrid, tmp_path, str(base), nodes=2):
        assert result["mesh"] == [2, 2] and result["keys"] == 136
        assert result["state_mismatch"] == result["shard_mismatch"] == result["buffer_mismatch"] == []
        assert result["loss"][0] == result["loss"][1]


def _failures(ctx, paths: dict[str, str]) -> dict:
    """(error type, message) per rank for: a missing checkpoint, a truncated one, and one that breaks after the
    check (between `build_meta_vlm` and `load_weights`)."""
    from vla_train.training.distributed import barrier
    from vla_train.training.loading import build_meta_vlm, load_weights
    from vla_train.training.parallelize import parallelize_vlm

    model_cfg = get_model_config(MODEL_ID)
    errors = {}
    for name, path in (("missing", paths["missing"]), ("truncated", paths["truncated"])):
        try:
            build_meta_vlm(ModelSource(model_cfg, Path(path)))
        except Exception as error:  # reported to the test
            errors[name] = [type(error).__name__, str(error)]
    source = ModelSource(model_cfg, Path(paths["breaks"]))
    vlm = build_meta_vlm(source)
    parallelize_vlm(vlm, ctx, strategy="full-shard", stage="vla-train")
    if ctx.is_main:
        Path(paths["breaks"]).write_bytes(Path(paths["breaks"]).read_bytes()[:3000])
    barrier()
    try:
        load_weights(vlm, source, ctx)
    except Exception as error:  # reported to the test
        errors["breaks after the check"] = [type(error).__name__, str(error)]
    return errors


def test_a_missing_or_corrupt_checkpoint_raises_on_every_rank(tmp_path):
    checkpoint = save_base_vlm(build_tiny(MODEL_ID), get_model_config(MODEL_ID), tmp_path / "base")
    truncated, breaks = tmp_path / "truncated.pt", tmp_path / "breaks.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:3000])
    breaks.write_bytes(checkpoint.read_bytes())
    paths = {"missing": str(tmp_path / "missing.pt"), "truncated": str(truncated), "breaks": str(breaks)}
    rank0, rank1 = _spawn(_failures, tmp_path, paths)
    assert rank0["missing"] == ["FileNotFoundError", f"Checkpoint {tmp_path / 'missing.pt'} does not exist (a run "
                                                     "directory needs checkpoints/latest-checkpoint.pt)."]
    assert rank0["truncated"][0] == "ValueError" and rank0["truncated"][1].startswith(
        f"{truncated} is not a readable torch checkpoint")
    assert rank0["breaks after the check"][0] == "ValueError" and rank0["breaks after the check"][1].startswith(
        f"{breaks} is not a readable torch checkpoint")
    assert rank1 == {
        "missing": ["RuntimeError", f"Another rank failed while checking the checkpoint of {MODEL_ID} from "
                                    f"{tmp_path / 'missing.pt'}; see its log."],
        "truncated": ["RuntimeError", f"Another rank failed while checking the checkpoint of {MODEL_ID} from "
                                      f"{truncated}; see its log."],
        "breaks after the check": ["RuntimeError", f"Another rank failed while reading the weights of {MODEL_ID} "
                                                   f"from {breaks}; see its log."],
    }


@pytest.mark.parametrize("family", sorted(LLM_FAMILIES))
def test_every_llm_family_recomputes_its_unsaved_buffers(family):
    """Built on the meta device then `to_empty` + `init_nonpersistent_buffers`: every buffer equals a normal build's."""
    spec = next(s for s in LLM_BACKBONES.values() if s.family == family and s.tiny_tokenizer_style is None)
    small = shrink_architecture(spec, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    expected = dict(LLMBackbone.from_config(small).named_buffers())
    with torch.device("meta"):
        backbone = LLMBackbone.from_config(small)
    backbone.to_empty(device="cpu")
    for buffer in backbone.buffers():
        buffer.fill_(float("nan"))
    backbone.init_nonpersistent_buffers()
    got = dict(backbone.named_buffers())
    rotary = ["llm.model.rotary_emb.inv_freq", "llm.model.rotary_emb.original_inv_freq"]
    scaled = ["llm.model.embed_tokens.embed_scale"] if family == "gemma" else []  # Gemma's sqrt(width) embedding
    assert sorted(got) == sorted(expected) == sorted([*scaled, *rotary])
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_buffer_nothing_recomputes_is_an_error(monkeypatch):
    with torch.device("meta"):
        vlm = build_vlm(get_model_config(MODEL_ID))
    monkeypatch.setattr(LLMBackbone, "init_nonpersistent_buffers", lambda self: None)
    with pytest.raises(RuntimeError, match=r"Buffers \['llm_backbone.llm.model.rotary_emb.inv_freq', 'llm_backbone"
                                           r".llm.model.rotary_emb.original_inv_freq'\] are in no state dict"):
        loading._materialize(vlm, torch.device("cpu"))


def test_the_vision_backbone_alone_has_build_vlms_seeded_weights():
    model_cfg = get_model_config(MODEL_ID)
    alone, within = build_vision_backbone(model_cfg).state_dict(), build_vlm(model_cfg).vision_backbone.state_dict()
    assert list(alone) == list(within) and all(torch.equal(alone[k], within[k]) for k in within)


def test_dropping_a_mapped_tensors_pages_keeps_its_values(tmp_path, log_records):
    vlm = _perturbed(MODEL_ID, 4)
    checkpoint = save_base_vlm(vlm, get_model_config(MODEL_ID), tmp_path)
    expected = vlm.llm_backbone.state_dict()
    mapped = read_checkpoint(checkpoint)["llm_backbone"]
    for name, tensor in mapped.items():
        assert torch.equal(tensor, expected[name])  # read: its pages are resident
        loading._drop_file_pages(tensor)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in mapped.items())  # read again from the file
    assert not [r for r in log_records.records if "madvise" in r.getMessage()]


def test_a_resume_allocates_the_shards_without_reading_the_base_weights(tmp_path, process_group):
    """`stream=False`: shards allocated on the device and unsaved buffers recomputed, the base `.pt` never opened
    (here it no longer exists): the resumed checkpoint fills every parameter afterwards."""
    from vla_train.training.distributed import init_distributed
    from vla_train.training.loading import build_meta_vlm, is_on_meta, load_weights
    from vla_train.training.parallelize import parallelize_vlm

    ctx = init_distributed()
    checkpoint = save_base_vlm(build_tiny(MODEL_ID), get_model_config(MODEL_ID), tmp_path / "base")
    source = base_vlm_source(tmp_path / "base")
    vlm = build_meta_vlm(source)
    parallelize_vlm(vlm, ctx, strategy="full-shard", stage="vla-train")
    checkpoint.unlink()
    load_weights(vlm, source, ctx, stream=False)
    assert not is_on_meta(vlm) and all(p.to_local().device.type == "cpu" for p in vlm.parameters())
    expected = dict(build_tiny(MODEL_ID).named_buffers())
    assert all(torch.equal(b, expected[name]) for name, b in vlm.named_buffers())
