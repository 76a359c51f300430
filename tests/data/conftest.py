"""Fixture datasets shared by the pipeline tests (written once per test session)."""

import pytest

from tests.data.rlds_fixtures import make_episodes, write_registry, write_rlds
from vla_train.data.registry import load_registry


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds")
    write_rlds(root / "data", "ds_a", {"train": make_episodes(8, 5, seed=0), "val": make_episodes(2, 5, seed=1)})
    write_rlds(root / "data", "ds_b", {"train": make_episodes(20, 4, seed=2)})
    write_registry(root / "registry", {"ds_a": {}, "ds_b": {}},
                   {"mix": [["ds_a", 1.0], ["ds_b", 0.5]], "only_b": [["ds_b", 2.0]]})
    return root


@pytest.fixture(scope="session")
def fixture_registry(fixture_root):
    return load_registry(base_dir=fixture_root / "registry")
