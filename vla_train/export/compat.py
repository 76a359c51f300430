"""Does an export load and predict with the transformers its users have? A check in another Python interpreter.

`check_export_compat(python)` builds tiny VLAs (seeded weights plus noise, so greedy actions vary), exports each with
`export_hf`, and runs `compat_probe.py` (the README's usage: `AutoModelForVision2Seq.from_pretrained(...,
trust_remote_code=True)`, `AutoProcessor`, `predict_action(**processor(prompt, image), unnorm_key=...,
do_sample=False)`) in `python`, e.g. a virtual environment with OpenVLA's transformers 4.40.1. The actions must equal,
bit for bit, what the native model's `predict_action` gives for the same images (PNG files) and instructions, and the
processor must not return `token_type_ids`. The probe runs offline (`HF_HUB_OFFLINE=1`) and without vla_train.
"""

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vla_train.config.model import ModelConfig, get_model_config
from vla_train.export.hf import DATASET_STATISTICS, export_hf
from vla_train.log import logger
from vla_train.models.build import build_vlm
from vla_train.models.run_dir import load_run_dir, save_base_vlm

PROBE = Path(__file__).with_name("compat_probe.py")
DEFAULT_MODEL_IDS = ("tiny-dinosiglip+tiny-llama", "tiny-siglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25")
INSTRUCTIONS = ("pick up the cup", "Put the red block on the blue plate")
IMAGE_SIZES = ((48, 80), (90, 33))  # (height, width): the letterbox and resize paths differ on these
STEP_CHECKPOINT = "step-000002-epoch-00-loss=1.2345.pt"
UNNORM_KEY = "demo_dataset"
DEMO_NORM_STATS = {UNNORM_KEY: {"action": {
    "q01": [-0.5, -0.4, -0.3, -1.0, -2.0, -3.0, 0.0], "q99": [0.5, 0.6, 0.7, 1.0, 2.0, 3.0, 1.0],
    "mask": [True, True, True, True, True, True, False]}}}


class ExportCompatError(RuntimeError):
    """The export did not load, or predicted other actions, in the interpreter under test."""


@dataclass
class ExportCompatConfig:
    """`vla-scripts/check_export_compat.py` options."""

    python: Path  # interpreter to check, e.g. /tmp/venv-tf440/bin/python (transformers, torch, timm, pillow)
    model_ids: list[str] = field(default_factory=lambda: list(DEFAULT_MODEL_IDS))  # tiny registered models
    work_dir: Path | None = None  # keep the run and export directories here (default: a deleted temporary one)
    timeout_s: int = 1200  # for the probe subprocess


def write_tiny_vla_run(model_cfg: ModelConfig, run_dir: Path, *, noise: float = 0.3, seed: int = 0,
                       norm_stats: dict[str, Any] | None = None) -> Path:
    """A VLA run directory built without training: `config.json`, `dataset_statistics.json` and
    `checkpoints/{latest-checkpoint.pt, step-000002-...pt}` of `model_cfg` (FP32), its weights plus seeded Gaussian
    noise of std `noise`. A registered model gets the VLA-run layout (`{"vla": {"base_vlm": <model id>}}`), any
    other keeps the base-VLM layout (`{"model": {...}}`). Returns `run_dir`."""
    norm_stats = norm_stats or DEMO_NORM_STATS
    vlm = build_vlm(model_cfg, vla=True, norm_stats=norm_stats)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vlm.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    latest = save_base_vlm(vlm, model_cfg, run_dir)
    latest.with_name(STEP_CHECKPOINT).write_bytes(latest.read_bytes())
    registered = model_cfg.model_id in ModelConfig.get_known_choices()
    if registered and model_cfg == get_model_config(model_cfg.model_id):
        (run_dir / "config.json").write_text(json.dumps({"vla": {"type": "tiny-test",
                                                                 "base_vlm": model_cfg.model_id}}))
    (run_dir / DATASET_STATISTICS).write_text(json.dumps(norm_stats))
    return run_dir


def write_images(directory: Path, seed: int = 0) -> list[Path]:
    """Seeded RGB PNG files of the sizes `IMAGE_SIZES` (lossless, so both interpreters read the same pixels)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for index, (height, width) in enumerate(IMAGE_SIZES):
        path = directory / f"image-{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def prepare_model(model_id: str, root: Path, images: list[Path]) -> tuple[dict[str, Any], np.ndarray]:
    """Export a noisy tiny `model_id` under `root`; returns (its probe manifest entry, native actions `[cases, A]`)."""
    run_dir = write_tiny_vla_run(get_model_config(model_id), root / model_id / "run")
    hf_dir = export_hf(run_dir, root / model_id / "hf", overwrite=True)
    native = load_run_dir(run_dir, vla=True, norm_stats=json.loads((run_dir / DATASET_STATISTICS).read_text())).eval()
    template = json.loads((hf_dir / "config.json").read_text())["vla_prompt_template"]
    cases, expected = [], []
    for image in images:
        for instruction in INSTRUCTIONS:
            cases.append({"image": str(image), "prompt": template.format(instruction=instruction.lower())})
            with Image.open(image) as loaded:
                expected.append(native.predict_action(loaded.convert("RGB"), instruction, UNNORM_KEY))
    return {"hf_dir": str(hf_dir), "unnorm_key": UNNORM_KEY, "cases": cases}, np.stack(expected)


def resolve_interpreter(python: str | Path) -> Path:
    """`python` as an absolute path (a bare name is looked up on PATH; symlinks are kept: a venv's python is one)."""
    found = shutil.which(str(python))
    if found is None:
        raise ValueError(f"python={str(python)!r} is not an executable. Fix: pass --python the interpreter of a virtual "
                         "environment with transformers, tokenizers, torch, timm and pillow (e.g. "
                         "/tmp/venv-tf440/bin/python).")
    return Path(found).absolute()


def run_probe(python: Path, manifest: dict[str, Any], work_dir: Path, timeout_s: int) -> dict[str, Any]:
    """Run `compat_probe.py` (copied into `work_dir`, the working directory) in `python`; returns its result."""
    probe, manifest_path, result_path = work_dir / PROBE.name, work_dir / "manifest.json", work_dir / "result.json"
    shutil.copyfile(PROBE, probe)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    result_path.unlink(missing_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(python), str(probe), str(manifest_path), str(result_path)]
    done = subprocess.run(command, cwd=work_dir, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not result_path.is_file():
        raise ExportCompatError(f"{python} could not load or run the exported models (exit {done.returncode}):\n"
                                f"{done.stderr[-6000:]}")
    return json.loads(result_path.read_text())


def compare(model_id: str, probed: dict[str, Any], expected: np.ndarray) -> list[str]:
    """Differences between the probe's actions / inputs for `model_id` and the native actions `[cases, A]`."""
    problems = []
    if "token_type_ids" in probed["input_names"]:
        problems.append(f"{model_id}: the processor returns token_type_ids ({probed['input_names']})")
    actual = np.asarray(probed["actions"], dtype=np.float64)
    if actual.shape != expected.shape or not np.array_equal(actual, expected):
        problems.append(f"{model_id}: exported actions {actual.tolist()} != native actions {expected.tolist()}")
    return problems


def check_export_compat(python: str | Path, model_ids: tuple[str, ...] | list[str] = DEFAULT_MODEL_IDS,
                        work_dir: str | Path | None = None, timeout_s: int = 1200) -> dict[str, Any]:
    """Export each tiny `model_ids` and predict with it in `python`; raise `ExportCompatError` unless the actions
    equal the native ones exactly. Returns `{"versions": {...}, "actions": {model_id: [[A floats] per case]}}`."""
    for model_id in model_ids:
        get_model_config(model_id)  # an unknown id fails here, before any work
    python = resolve_interpreter(python)
    with tempfile.TemporaryDirectory(prefix="export-compat-") as scratch:
        root = Path(work_dir) if work_dir is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        images = write_images(root / "images")
        prepared = {model_id: prepare_model(model_id, root, images) for model_id in model_ids}
        result = run_probe(Path(python), {"models": [entry for entry, _ in prepared.values()]}, root, timeout_s)
    problems = []
    for (model_id, (_, expected)), probed in zip(prepared.items(), result["models"], strict=True):
        problems += compare(model_id, probed, expected)
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    if problems:
        raise ExportCompatError(f"Exports differ under {python} ({versions}):\n  " + "\n  ".join(problems))
    actions = {model_id: probed["actions"] for model_id, probed in zip(prepared, result["models"], strict=True)}
    logger.info("Exports of %s load and predict the native actions exactly under %s (%s)", ", ".join(model_ids),
                python, versions)
    return {"versions": result["versions"], "actions": actions}
