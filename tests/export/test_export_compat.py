"""The export compatibility check (`vla-scripts/check_export_compat.py`): here it runs the README's usage of fresh
exports under this interpreter's transformers (the locked 5.x), in a subprocess that never imports vla_train. The
same script, pointed at a virtual environment with OpenVLA's transformers 4.40.1, checks what OpenVLA users run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from tests.export.test_hf_export import REPO
from vla_train.export.compat import (
    DEFAULT_MODEL_IDS,
    IMAGE_SIZES,
    INSTRUCTIONS,
    ExportCompatError,
    check_export_compat,
    compare,
    run_probe,
)


def test_the_check_script_passes_under_this_interpreter(tmp_path):
    command = [sys.executable, "vla-scripts/check_export_compat.py", "--python", sys.executable,
               "--work_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "load and predict the native actions exactly" in result.stderr
    probed = json.loads((tmp_path / "result.json").read_text())
    assert probed["versions"]["transformers"] == transformers.__version__
    assert len(probed["models"]) == len(DEFAULT_MODEL_IDS)
    for model in probed["models"]:
        assert model["input_names"] == ["attention_mask", "input_ids", "pixel_values"]
        actions = np.asarray(model["actions"])
        assert actions.shape == (len(IMAGE_SIZES) * len(INSTRUCTIONS), 7)
        assert len({tuple(row) for row in actions}) > 1, "the noisy weights should make the actions vary"


def test_differences_and_token_type_ids_are_reported():
    expected = np.array([[0.1, 0.2], [0.3, 0.4]])
    same = {"actions": expected.tolist(), "input_names": ["attention_mask", "input_ids", "pixel_values"]}
    assert compare("m", same, expected) == []
    off = dict(same, actions=[[0.1, 0.2], [0.3, 0.4000000000000001]], input_names=["input_ids", "token_type_ids"])
    problems = compare("m", off, expected)
    assert len(problems) == 2 and "token_type_ids" in problems[0] and "!= native actions" in problems[1]


def test_a_failing_interpreter_is_reported_with_its_output(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: no transformers here' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(ExportCompatError, match=r"(?s)exit 3.*no transformers here"):
        run_probe(fake, {"models": []}, tmp_path, timeout_s=60)


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"is not an executable. Fix: pass --python"):
        check_export_compat(tmp_path / "no-python", work_dir=tmp_path / "work")
    with pytest.raises(ValueError, match="Unknown model id 'tiny-nope'"):
        check_export_compat(sys.executable, ["tiny-nope"], work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()
