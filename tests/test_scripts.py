"""Entry points run as a user runs them (fresh processes, real files)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_make_base_vlm_writes_a_loadable_run_dir(tmp_path):
    run_dir = tmp_path / "tiny"
    command = [sys.executable, "vla-scripts/make_base_vlm.py", "--model.type", "tiny-siglip+tiny-llama",
               "--run_dir", str(run_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reload reproduces its logits exactly" in result.stderr
    assert json.loads((run_dir / "config.json").read_text())["model"]["llm_backbone_id"] == "tiny-llama"
    state = torch.load(run_dir / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert set(state["model"]) == {"vision_backbone", "projector", "llm_backbone"}

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite true" in again.stderr
