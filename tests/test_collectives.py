"""Every tensor collective of the package goes through `vla_train.training.distributed`, which places the tensor on
the device its group's backend takes (NCCL rejects CPU tensors that gloo accepts, so CPU tests cannot see a misplaced
tensor at the call site). Checked statically over the source, and at run time in strict mode."""

import ast
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vla_train.training import distributed
from vla_train.training.distributed import TENSOR_COLLECTIVES, free_port

PACKAGE = Path(distributed.__file__).resolve().parents[1]
ROUTER = Path(distributed.__file__).resolve()


def _direct_collectives(path: Path) -> list[str]:
    """`file:line name` of each call of a torch.distributed tensor collective (via `dist.x`, `torch.distributed.x`
    or `from torch.distributed import x`)."""
    tree = ast.parse(path.read_text())
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "torch.distributed" for alias in node.names if alias.name in TENSOR_COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        direct = isinstance(func, ast.Attribute) and func.attr in TENSOR_COLLECTIVES and \
            ast.unparse(func.value) in ("dist", "torch.distributed", "torch.distributed.distributed_c10d")
        if direct or (isinstance(func, ast.Name) and name in imported):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    return found


def test_no_module_but_the_router_calls_a_tensor_collective():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != ROUTER for hit in _direct_collectives(path)]
    assert offenders == [], "route these through vla_train.training.distributed: " + ", ".join(offenders)


def test_the_scan_finds_a_direct_call(tmp_path):
    module = PACKAGE / "_scan_probe.py"  # inside the package tree, as a real offender would be
    try:
        module.write_text("import torch.distributed as dist\nfrom torch.distributed import broadcast as b\n"
                          "def f(t):\n    dist.all_reduce(t)\n    b(t, 0)\n")
        assert [hit.split(" ")[1] for hit in _direct_collectives(module)] == ["all_reduce", "b"]
    finally:
        module.unlink()



@pytest.fixture
def strict_group(monkeypatch):
    for name in TENSOR_COLLECTIVES:  # restored after the test
        monkeypatch.setattr(dist, name, getattr(dist, name))
    distributed.install_strict_collectives()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(minutes=2))
    yield
    dist.destroy_process_group()


def test_strict_mode_refuses_direct_calls_from_the_package_only(strict_group):
    namespace = {"__name__": "vla_train.training.some_module", "dist": dist, "torch": torch}
    exec("def offender():\n    dist.all_reduce(torch.ones(1))\n", namespace)
    with pytest.raises(RuntimeError, match=r"vla_train.training.some_module calls torch.distributed.all_reduce "
                                           r"directly.*NCCL rejects CPU tensors"):
        namespace["offender"]()
    tensor = torch.ones(2)
    dist.all_reduce(tensor)  # the tests' and torch's own calls pass
    assert distributed.all_reduce(torch.tensor([3.0])).item() == 3.0  # the router passes
    assert distributed.all_ranks_agree(True) and distributed.broadcast_object({"a": 1}) == {"a": 1}
