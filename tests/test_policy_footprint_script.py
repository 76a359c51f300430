"""benchmarks/policy_footprint.py on the tiny Qwen base: OFT and VLA-Adapter rows with parameters, recipe trainable
parameters, peak memory and chunk latency, each measured in its own process."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("policy_footprint", REPO / "benchmarks" / "policy_footprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_policy_footprint_reports_oft_and_vla_adapter(tmp_path, capsys):
    out = tmp_path / "footprint.json"
    results = load_script().main(["--model", "tiny-dinosiglip+tiny-qwen25", "--warmup", "0", "--calls", "1",
                                  "--json", str(out)])
    rows = {row["policy"]: row for row in results["rows"]}
    assert list(rows) == ["oft-l1", "vla-adapter"]
    for row in rows.values():
        assert row["seconds_per_chunk_median"] > 0 and row["peak_memory_bytes"] > 2**20
        assert row["trainable_parameters_recipe"] > row["policy_module_parameters"] > 0  # + the LoRA adapters
        assert row["parameters"] > row["policy_module_parameters"]
    assert rows["vla-adapter"]["lora_rank"] == 64 and rows["oft-l1"]["lora_rank"] == 32
    printed = capsys.readouterr().out
    assert "vla-adapter" in printed and "peak memory" in printed
    assert json.loads(out.read_text())["rows"] == results["rows"]
