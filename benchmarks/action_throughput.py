"""Robot action steps per second: OpenVLA's autoregressive action tokens vs OpenVLA-OFT's parallel decoding.

    python benchmarks/action_throughput.py [--model tiny-dinosiglip+tiny-llama] [--device cpu|cuda]
        [--dtype fp32|bf16] [--calls 20] [--warmup 2] [--diffusion-steps 50] [--chunk-length 8] [--json OUT]

On one base VLM (registry architecture, seeded random weights, nothing downloaded) it builds three policies that share
its vision backbone, projector and LLM: `openvla` (`OpenVLA.generate_action_token_ids`: greedy decoding of A = 7
action tokens with a KV cache, 1 prefill + A - 1 cached passes, one robot step per call) and OFT with the `l1` head
(one bidirectional LLM pass) or the `diffusion` head (`--diffusion-steps` DDIM passes), both returning a chunk of
H = `--chunk-length` steps per call (`OFTVLM.predict_action_chunk`, proprio zeros). The input is one random image
through the model's own image transform and the training prompt's prefix (`vla_prompt_prefix_ids`), repeated
`--batch-size` times. After `--warmup` calls it times `--calls` calls under `torch.inference_mode()`, from preprocessed
tensors to normalized actions on the host (image transform and tokenization are excluded: identical for all three).
Printed: the machine, date, model, parameter counts, and per policy the median seconds per call, robot steps per
second (batch * steps per call / median) and its ratio to `openvla`. With weights this random the actions mean
nothing; the cost per call does not depend on them (OpenVLA always decodes exactly A tokens).
A base LLM whose tokenizer is not in the local Hugging Face cache (e.g. MiniVLA's Qwen2.5) gets the project's
character-level tiny tokenizer of its family as a stand-in: its prompt is longer than the real one (printed).
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vla_train.config.model import get_model_config
from vla_train.models.build import build_vlm
from vla_train.models.llm import find_local_tokenizer, get_llm_backbone_spec, prepare_tokenizer
from vla_train.models.oft.model import OFTVLM
from vla_train.models.openvla import OpenVLA
from vla_train.models.tokenizers import build_tiny_tokenizer
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

ACTION_DIM, PROPRIO_DIM = 7, 8
NORM_STATS = {"bench": {"action": {"q01": [-1.0] * ACTION_DIM, "q99": [1.0] * ACTION_DIM}}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-dinosiglip+tiny-llama",
                        help="registered model id, e.g. prism-qwen25-extra-dinosiglip-224px+0_5b (MiniVLA size)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per policy")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per policy first")
    parser.add_argument("--batch-size", type=int, default=1, help="observations per call")
    parser.add_argument("--diffusion-steps", type=int, default=50, help="DDIM steps of the OFT diffusion head")
    parser.add_argument("--chunk-length", type=int, default=8, help="OFT chunk length H (steps per call)")
    parser.add_argument("--instruction", default="put the red block in the bowl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    return parser.parse_args(argv)


def build_openvla(model_id: str) -> tuple[OpenVLA, str]:
    """The model's OpenVLA (seeded init, FP32, CPU) and a note on its tokenizer (own or stand-in)."""
    model_cfg = get_model_config(model_id)
    spec = get_llm_backbone_spec(model_cfg.llm_backbone_id)
    if find_local_tokenizer(spec, model_cfg.llm_max_length) is not None:
        return build_vlm(model_cfg, vla=True, norm_stats=NORM_STATS, inference_mode=True), "own"
    vlm = build_vlm(model_cfg, inference_mode=True)
    style = "qwen" if spec.family == "qwen2" else "llama"
    backbone = vlm.llm_backbone
    backbone.tokenizer = prepare_tokenizer(spec, build_tiny_tokenizer(style, model_cfg.llm_max_length))
    backbone.llm.config.pad_token_id = backbone.tokenizer.pad_token_id
    vla = OpenVLA(vlm.model_id, vlm.vision_backbone, backbone, arch_specifier=vlm.arch_specifier,
                  enable_mixed_precision_training=vlm.enable_mixed_precision_training, norm_stats=NORM_STATS)
    vla.projector = vlm.projector  # the seeded projector build_vlm made
    return vla, f"stand-in: tiny '{style}' tokenizer ({spec.hf_hub_path} is not in the local HF cache)"


def make_inputs(vla: OpenVLA, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """`(input_ids [B, T], pixel_values [B, ...] or a dict of them, proprio zeros [B, Q])` on `device`."""
    rng = np.random.default_rng(args.seed)
    image = Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8))
    llm = vla.llm_backbone
    prefix = vla_prompt_prefix_ids(llm.prompt_builder_fn, llm.get_tokenizer(), args.instruction)
    batch = args.batch_size
    input_ids = torch.tensor([prefix] * batch, dtype=torch.long, device=device)
    pixels = vla.vision_backbone.get_image_transform()(image)
    if isinstance(pixels, dict):
        pixel_values = {k: v[None].expand(batch, *v.shape).to(device, dtype) for k, v in pixels.items()}
    else:
        pixel_values = pixels[None].expand(batch, *pixels.shape).to(device, dtype)
    return input_ids, pixel_values, torch.zeros(batch, PROPRIO_DIM, device=device, dtype=dtype)


def time_calls(fn: Callable[[], Any], calls: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `calls` calls of `fn` (which returns host data), after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(calls):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def load_average() -> str | None:
    """The 1/5/15-minute load averages (other processes compete for the CPUs: they slow CPU timings)."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.is_file() else None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model (/proc/cpuinfo), logical CPUs, torch threads and version, device (and GPU name)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": names[0] if names else platform.processor() or "unknown", "logical_cpus": len(names) or None,
            "torch_threads": torch.get_num_threads(), "device": str(device), "gpu": gpu, "torch": torch.__version__}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three policies on one base model, time them, and return the results (see module docstring)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    load_before = load_average()
    vla, tokenizer_note = build_openvla(args.model)
    vla = vla.to(device=device, dtype=dtype).eval()
    input_ids, pixel_values, proprio = make_inputs(vla, args, device, dtype)
    mask = torch.ones_like(input_ids, dtype=torch.bool)

    def openvla_call() -> np.ndarray:
        token_ids = vla.generate_action_token_ids(input_ids, pixel_values, ACTION_DIM)
        return vla.action_tokenizer.decode_token_ids_to_actions(token_ids.cpu().numpy())

    policies: list[tuple[str, str, torch.nn.Module, Callable[[], Any], int, int]] = [
        ("openvla", "tokens", vla, openvla_call, 1, ACTION_DIM)]
    for head in ("l1", "diffusion"):
        oft = OFTVLM.from_vlm(vla, action_dim=ACTION_DIM, chunk_length=args.chunk_length, proprio_dim=PROPRIO_DIM,
                              head=head).to(device=device, dtype=dtype).eval()
        generator = torch.Generator(device=device).manual_seed(args.seed)

        def oft_call(oft: OFTVLM = oft, generator: torch.Generator = generator) -> np.ndarray:
            chunk = oft.predict_action_chunk(input_ids, mask, pixel_values, proprio, generator=generator,
                                             num_inference_steps=args.diffusion_steps)
            return chunk.float().cpu().numpy()

        passes = 1 if head == "l1" else args.diffusion_steps
        policies.append((f"oft-{head}", head, oft, oft_call, args.chunk_length, passes))

    rows = []
    for name, head, model, fn, steps, passes in policies:
        times = time_calls(fn, args.calls, args.warmup, device)
        print(f"{name}: {len(times)} calls, median {statistics.median(times):.4f} s", file=sys.stderr, flush=True)
        median = statistics.median(times)
        rows.append({"policy": name, "head": head, "batch": args.batch_size, "steps_per_call": steps,
                     "action_dims_per_call": steps * ACTION_DIM, "llm_passes_per_call": passes,
                     "seconds_per_call_median": median, "seconds_per_call_min": min(times),
                     "steps_per_second": args.batch_size * steps / median, "parameters": count_parameters(model)})
    for row in rows:
        row["ratio_vs_openvla"] = row["steps_per_second"] / rows[0]["steps_per_second"]
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(device), "model": args.model, "llm_backbone": vla.llm_backbone.identifier,
            "vision_backbone": vla.vision_backbone.identifier, "dtype": args.dtype, "tokenizer": tokenizer_note,
            "prompt_tokens": input_ids.shape[1], "calls": args.calls, "warmup": args.warmup,
            "diffusion_steps": args.diffusion_steps, "chunk_length": args.chunk_length,
            "load_average": {"start": load_before, "end": load_average()}, "rows": rows}


def machine_line(machine: dict[str, Any]) -> str:
    """The report's machine line (`machine_info`'s fields)."""
    return (f"machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), torch {machine['torch']}, "
            f"{machine['torch_threads']} threads, device {machine['device']}"
            + (f" ({machine['gpu']})" if machine["gpu"] else ""))


def format_report(results: dict[str, Any]) -> str:
    lines = [f"date: {results['date']}", machine_line(results["machine"]),
             f"model: {results['model']} (vision {results['vision_backbone']}, LLM {results['llm_backbone']}), "
             f"{results['dtype']}, random weights; tokenizer: {results['tokenizer']}; "
             f"prompt {results['prompt_tokens']} tokens",
             f"timed calls: {results['calls']} after {results['warmup']} warmup; diffusion steps "
             f"{results['diffusion_steps']}; chunk length {results['chunk_length']}; load average "
             f"{results['load_average']['start']} at start, {results['load_average']['end']} at end", ""]
    header = (f"{'policy':<14} {'head':<9} {'params':>13} {'batch':>5} {'steps/call':>10} {'LLM passes':>10} "
              f"{'s/call (median)':>15} {'s/call (min)':>12} {'steps/s':>10} {'x openvla':>9}")
    lines += [header, "-" * len(header)]
    for row in results["rows"]:
        lines.append(f"{row['policy']:<14} {row['head']:<9} {row['parameters']:>13,} {row['batch']:>5} "
                     f"{row['steps_per_call']:>10} {row['llm_passes_per_call']:>10} "
                     f"{row['seconds_per_call_median']:>15.4f} {row['seconds_per_call_min']:>12.4f} "
                     f"{row['steps_per_second']:>10.4g} {row['ratio_vs_openvla']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if min(args.calls, args.batch_size, args.diffusion_steps, args.chunk_length) < 1 or args.warmup < 0:
        raise SystemExit("--calls, --batch-size, --diffusion-steps and --chunk-length must be >= 1, --warmup >= 0.")
    results = benchmark(args)
    publish(results, format_report(results), args.json)
    return results


def publish(results: dict[str, Any], report: str, json_path: Path | None) -> None:
    """Print the report; write the results as JSON to `json_path` when given."""
    print(report, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
