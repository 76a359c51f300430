"""The README's usage of exported directories, run by `vla_train.export.compat` in another Python interpreter.

Usage: `python compat_probe.py <manifest.json> <result.json>`. This file is run as a script, never imported, and
imports only the standard library, numpy, PIL and transformers (the remote code brings torch and timm): the
interpreter under test needs no vla_train. The manifest lists exported directories, each with its `unnorm_key` and
cases (`{"image": <png path>, "prompt": <text>}`); for every case the probe runs

    vla = AutoModelForVision2Seq.from_pretrained(hf_dir, trust_remote_code=True)   # 5.x: AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
    vla.predict_action(**processor(prompt, image), unnorm_key=unnorm_key, do_sample=False)

and writes `{"versions": {...}, "models": [{"hf_dir", "actions": [[A floats] per case], "input_names"}]}`.
"""

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from PIL import Image

PACKAGES = ("transformers", "tokenizers", "torch", "timm", "numpy", "pillow")


def versions() -> dict[str, str]:
    """Python and package versions of this interpreter."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def predict(entry: dict[str, Any]) -> dict[str, Any]:
    """Load one exported directory as its README says and predict an action `[A]` per case."""
    auto_model = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
    vla = auto_model.from_pretrained(entry["hf_dir"], trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(entry["hf_dir"], trust_remote_code=True)
    actions, input_names = [], set()
    for case in entry["cases"]:
        inputs = processor(case["prompt"], Image.open(case["image"]).convert("RGB"))
        input_names.update(inputs.keys())
        action = vla.predict_action(**inputs, unnorm_key=entry["unnorm_key"], do_sample=False)
        actions.append([float(value) for value in np.asarray(action, dtype=np.float64)])
    return {"hf_dir": entry["hf_dir"], "actions": actions, "input_names": sorted(input_names),
            "model_class": type(vla).__name__, "auto_class": auto_model.__name__}


def main(manifest_path: str, result_path: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    models = [predict(entry) for entry in manifest["models"]]
    leaked = sorted(name for name in sys.modules if name.split(".")[0] == "vla_train")
    if leaked:
        raise RuntimeError(f"The exported remote code imported {leaked[:5]}: exports must load without vla_train.")
    Path(result_path).write_text(json.dumps({"versions": versions(), "models": models}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} <manifest.json> <result.json>")
    main(sys.argv[1], sys.argv[2])
