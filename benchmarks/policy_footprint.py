"""Chunk policies side by side on one base VLM: parameters, trainable parameters, peak memory and chunk latency.

    python benchmarks/policy_footprint.py [--model prism-qwen25-extra-dinosiglip-224px+0_5b] [--device cpu|cuda]
        [--dtype fp32|bf16] [--calls 5] [--warmup 1] [--json OUT]

On one base VLM (registry architecture, seeded random weights, nothing downloaded; MiniVLA's Qwen2.5-0.5B +
DINOv2/SigLIP by default, VLA-Adapter's base) it builds OpenVLA-OFT (L1 head, chunks of 8, 8-D proprio, third-person +
wrist camera) and VLA-Adapter (64 ActionQueries, Pro Bridge blocks over every layer, the same cameras and proprio),
each in a fresh Python process, and reports for each:
- parameters (the whole policy model) and the policy's own modules (heads, projectors, ActionQueries);
- trainable parameters of its published recipe: LoRA on every linear layer of the ViT, projector and LLM (OFT r=32,
  VLA-Adapter r=64) plus the policy's own modules, which train in full;
- peak memory of the process while it builds the model and predicts chunks (CPU: the peak resident set size, from
  `getrusage`; CUDA: `torch.cuda.max_memory_allocated`), and the median seconds of `predict_action_chunk` (one
  observation, preprocessed tensors to normalized actions on the host, under `torch.inference_mode()`).
With weights this random the actions mean nothing; the cost of a call does not depend on them.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vla_train.config.lora import LoRAConfig
from vla_train.config.policy import OFTPolicyConfig, PolicyConfig, VLAAdapterPolicyConfig
from vla_train.models.lora import apply_lora, lora_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from action_throughput import (  # the sibling benchmark's helpers
    DTYPES,
    build_openvla,
    load_average,
    machine_info,
    machine_line,
    make_inputs,
    publish,
    time_calls,
)

CHUNK, ACTION_DIM, PROPRIO_DIM, CAMERAS = 8, 7, 8, ["primary", "wrist"]
POLICIES: dict[str, tuple[PolicyConfig, LoRAConfig]] = {
    "oft-l1": (OFTPolicyConfig(head="l1", chunk_length=CHUNK, action_dim=ACTION_DIM, proprio_dim=PROPRIO_DIM,
                               cameras=CAMERAS), LoRAConfig(enabled=True, rank=32, alpha=16)),
    "vla-adapter": (VLAAdapterPolicyConfig(chunk_length=CHUNK, action_dim=ACTION_DIM, proprio_dim=PROPRIO_DIM,
                                           cameras=CAMERAS, num_action_queries=64, block="pro"),
                    LoRAConfig(enabled=True, rank=64, alpha=128)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="prism-qwen25-extra-dinosiglip-224px+0_5b",
                        help="registered model id (tests: tiny-dinosiglip+tiny-qwen25)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--calls", type=int, default=5, help="timed predict_action_chunk calls per policy")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per policy first")
    parser.add_argument("--instruction", default="put the red block in the bowl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    parser.add_argument("--only", choices=sorted(POLICIES), default=None, help=argparse.SUPPRESS)  # one child run
    parser.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = 1
    return args


def trainable_parameters(model: torch.nn.Module, lora: LoRAConfig) -> tuple[int, int]:
    """`(parameters of the policy's own modules, trainable parameters under the recipe's LoRA)`; adapts `model`."""
    own = sum(p.numel() for p in model.always_trainable())
    apply_lora(model, lora)
    return own, own + sum(p.numel() for p in lora_parameters(model))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure_policy(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One policy in this (fresh) process: build, count, time; the peak memory includes building the model."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    policy, lora = POLICIES[name]
    vla, tokenizer_note = build_openvla(args.model)
    model = policy.build_model(vla)
    parameters = sum(p.numel() for p in model.parameters())
    model = model.to(device=device, dtype=dtype).eval()
    input_ids, pixel_values, proprio = make_inputs(vla, args, device, dtype)
    cameras = [pixel_values] * len(CAMERAS)
    mask = torch.ones_like(input_ids, dtype=torch.bool)

    def call() -> Any:
        return model.predict_action_chunk(input_ids, mask, cameras, proprio).float().cpu().numpy()

    times = time_calls(call, args.calls, args.warmup, device)
    peak = peak_memory_bytes(device)
    own, trainable = trainable_parameters(model, lora)
    return {"policy": name, "family": policy.family, "parameters": parameters, "policy_module_parameters": own,
            "trainable_parameters_recipe": trainable, "lora_rank": lora.rank,
            "seconds_per_chunk_median": statistics.median(times), "seconds_per_chunk_min": min(times),
            "chunk": [CHUNK, ACTION_DIM], "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "prompt_tokens": input_ids.shape[1], "tokenizer": tokenizer_note}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Each policy in its own fresh Python process (this script with `--only`, so each peak is its own)."""
    load_before, rows = load_average(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name in POLICIES:
            row_file = Path(tmp) / f"{name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--row-json", str(row_file),
                       "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--calls",
                       str(args.calls), "--warmup", str(args.warmup), "--instruction", args.instruction, "--seed",
                       str(args.seed)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
            row = json.loads(row_file.read_text())
            print(f"{name}: median {row['seconds_per_chunk_median']:.4f} s per chunk", file=sys.stderr, flush=True)
            rows.append(row)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(torch.device(args.device)), "model": args.model, "dtype": args.dtype,
            "calls": args.calls, "warmup": args.warmup,
            "load_average": {"start": load_before, "end": load_average()}, "rows": rows}


def format_report(results: dict[str, Any]) -> str:
    lines = [f"date: {results['date']}", machine_line(results["machine"]),
             f"model: {results['model']}, {results['dtype']}, random weights; tokenizer: "
             f"{results['rows'][0]['tokenizer']}; prompt {results['rows'][0]['prompt_tokens']} tokens; "
             f"{results['calls']} timed calls after {results['warmup']} warmup; load average "
             f"{results['load_average']['start']} at start, {results['load_average']['end']} at end", ""]
    header = (f"{'policy':<12} {'params':>14} {'policy modules':>14} {'trainable (LoRA)':>17} {'peak memory':>12} "
              f"{'s/chunk (median)':>16} {'s/chunk (min)':>13}")
    lines += [header, "-" * len(header)]
    for row in results["rows"]:
        lines.append(f"{row['policy']:<12} {row['parameters']:>14,} {row['policy_module_parameters']:>14,} "
                     f"{row['trainable_parameters_recipe']:>17,} {row['peak_memory_bytes'] / 2**30:>8.2f} GiB "
                     f"{row['seconds_per_chunk_median']:>16.4f} {row['seconds_per_chunk_min']:>13.4f}")
    lines.append(f"(peak memory: {results['rows'][0]['peak_memory_kind']}; chunks of {CHUNK} x {ACTION_DIM})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.calls < 1 or args.warmup < 0:
        raise SystemExit("--calls must be >= 1 and --warmup >= 0.")
    if args.only is not None:  # a child: one policy, its row to --row-json
        row = measure_policy(args.only, args)
        args.row_json.write_text(json.dumps(row))
        return row
    results = benchmark(args)
    publish(results, format_report(results), args.json)
    return results


if __name__ == "__main__":
    main()
