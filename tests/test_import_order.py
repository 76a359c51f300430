"""The torch/torchvision/timm-before-tensorflow import order, proven in fresh processes."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted((REPO / "vla-scripts").glob("*.py"))


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_package_then_tensorflow_works():
    result = run_python("-c", "import vla_train, tensorflow as tf, torchvision; print(tf.constant(2).numpy() * 21)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("42")


def test_tensorflow_first_is_a_clear_error_not_a_segfault():
    result = run_python("-c", "import tensorflow, vla_train")
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "import vla_train" in result.stderr and "before `import tensorflow`" in result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_entry_point_runs_in_a_fresh_process(script):
    result = run_python(str(script), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout


def test_entry_points_import_vla_train_first():
    assert ENTRY_POINTS, "vla-scripts/ has no entry points"
    for script in ENTRY_POINTS:
        code = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert code[0].startswith("import vla_train"), f"{script.name}: first import is {code[0]!r}"


def test_whole_test_suite_imports_in_a_fresh_process():
    result = run_python("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.lower().splitlines()[-1]
