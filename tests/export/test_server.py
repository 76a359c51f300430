"""The action server over real loopback HTTP: answers equal `OpenVLA.predict_action`, bad requests get a 4xx with a
message, concurrent requests share batched forwards, and `vla-scripts/deploy.py` serves a run directory."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import httpx
import json_numpy
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from vla_train.config.deploy import DeployConfig, validate_deploy_config
from vla_train.config.model import get_model_config
from vla_train.export.client import ActionClient, ActionServerError
from vla_train.export.server import (
    HFActionModel,
    OpenVLAActionModel,
    Prepared,
    RequestBatcher,
    create_app,
    find_checkpoint,
    load_action_model,
    load_run_dir_model,
)
from vla_train.log import logger
from vla_train.models.build import build_vlm
from vla_train.models.run_dir import save_base_vlm

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-dinosiglip+tiny-llama"
NORM_STATS = {
    "demo_a": {"action": {"q01": [-0.5, -0.4, -0.3, -1.0, -2.0, -3.0, 0.0], "q99": [0.5, 0.6, 0.7, 1.0, 2.0, 3.0, 1.0],
                          "mask": [True, True, True, True, True, True, False]}},
    "demo_b": {"action": {"q01": [-1.0] * 7, "q99": [2.0] * 7, "mask": [True] * 7}},
}
SAME_LENGTH = ("pick up the red block", "pick up the tan block", "pick up the big block")  # equal prompt lengths


def _image(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _reference(model: OpenVLAActionModel, image: np.ndarray, instruction: str, unnorm_key: str) -> np.ndarray:
    return model.vla.predict_action(Image.fromarray(image), instruction, unnorm_key=unnorm_key)


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Servers, batchers and request worker threads are gone (library daemons such as tqdm's monitor may stay)."""
    before = set(threading.enumerate())
    yield
    ours = [t for t in set(threading.enumerate()) - before
            if not t.daemon or t.name == "vla-action-batcher" or "AnyIO" in t.name]
    for thread in ours:
        thread.join(10)  # AnyIO's worker threads exit just after their event loop closes
    assert not [t for t in ours if t.is_alive()], f"threads left running: {ours}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny VLA run directory (seeded weight noise, so actions differ across inputs) with two datasets."""
    model_cfg = get_model_config(MODEL_ID)
    vla = build_vlm(model_cfg, vla=True, norm_stats=NORM_STATS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in vla.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("served_run")
    save_base_vlm(vla, model_cfg, path)
    (path / "dataset_statistics.json").write_text(json.dumps(NORM_STATS))
    return path


@pytest.fixture(scope="module")
def model(run_dir) -> OpenVLAActionModel:
    return load_run_dir_model(run_dir, device="cpu")


@contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; always shut it down (lifespan included)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive() and not app.state.batcher.running


@pytest.fixture(scope="module")
def url(model) -> Iterator[str]:
    with serving(create_app(model)) as base_url:
        yield base_url


def test_client_answers_equal_predict_action(model, url):
    requests = [(_image(1), "Pick up the red block", "demo_a"), (_image(2, 64, 64), "open the drawer", "demo_b")]
    with ActionClient(url, timeout=60) as client, ActionClient(url + "/act", timeout=60, encoded=True) as encoded:
        for image, instruction, key in requests:
            expected = _reference(model, image, instruction, key)
            np.testing.assert_array_equal(client.act(image, instruction, unnorm_key=key), expected)
            np.testing.assert_array_equal(encoded.act(image, instruction, unnorm_key=key), expected)
        answers = [client.act(image, instruction, unnorm_key=key) for image, instruction, key in requests]
    assert answers[0].shape == (7,) and answers[0].dtype == np.float64
    assert not np.array_equal(answers[0], answers[1]) and len(set(answers[0].tolist())) > 1  # not a constant model


def test_raw_json_numpy_and_encoded_payloads(model, url):
    image = _image(3)
    expected = _reference(model, image, "stack the blocks", "demo_b")
    payload = {"image": image, "instruction": "stack the blocks", "unnorm_key": "demo_b"}
    plain = httpx.post(url + "/act", content=json_numpy.dumps(payload), timeout=60)
    assert plain.status_code == 200
    np.testing.assert_array_equal(json_numpy.loads(plain.text), expected)
    encoded = httpx.post(url + "/act", json={"encoded": json_numpy.dumps(payload)}, timeout=60)
    assert encoded.status_code == 200 and isinstance(encoded.json(), str)  # double-encoded, as the reference
    np.testing.assert_array_equal(json_numpy.loads(encoded.json()), expected)


def test_health(url):
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["model_id"] == MODEL_ID and health["unnorm_keys"] == ["demo_a", "demo_b"]
    assert health["action_dim"] == 7 and health["action_dims"] == {"demo_a": 7, "demo_b": 7}
    with ActionClient(url) as client:
        assert client.health() == health


GOOD = {"image": _image(4, 8, 8), "instruction": "wave", "unnorm_key": "demo_a"}
BAD_REQUESTS = [
    ({**GOOD, "image": GOOD["image"].astype(np.float32)}, 422, "got a float32 array of shape (8, 8, 3)"),
    ({**GOOD, "image": GOOD["image"][..., 0]}, 422, "got a uint8 array of shape (8, 8)"),
    ({**GOOD, "image": np.zeros((8, 8, 4), np.uint8)}, 422, "shape [H, W, 3]; got a uint8 array of shape (8, 8, 4)"),
    ({**GOOD, "image": GOOD["image"].tolist()}, 422, "got a JSON list of length 8 (send numpy arrays with json_numpy)"),
    ({k: v for k, v in GOOD.items() if k != "image"}, 422, "Missing field(s) ['image']"),
    ({k: v for k, v in GOOD.items() if k != "instruction"}, 422, "Missing field(s) ['instruction']"),
    ({**GOOD, "instruction": "  "}, 422, "'instruction' must be a non-empty string; got '  '"),
    ({**GOOD, "instruction": 3}, 422, "'instruction' must be a non-empty string; got int 3"),
    ({**GOOD, "unnorm_key": "bridge_orig"}, 422, "Unknown unnorm_key 'bridge_orig'; this model knows ['demo_a', 'de"),
    ({k: v for k, v in GOOD.items() if k != "unnorm_key"}, 422, "several datasets ['demo_a', 'demo_b']; pass 'unnorm"),
    ("{not json", 400, "Could not decode the request body"),
    ([1, 2], 400, "The payload must be a JSON object, got list"),
    ({"encoded": json_numpy.dumps(GOOD), "instruction": "x"}, 400, "must be exactly {'encoded': <str>}"),
    ({"encoded": "not json"}, 400, "Could not decode the request body"),
]


def test_bad_requests_get_a_4xx_with_a_message(url):
    for payload, status, message in BAD_REQUESTS:
        body = payload if isinstance(payload, str) else json_numpy.dumps(payload)
        response = httpx.post(url + "/act", content=body, timeout=30)
        assert response.status_code == status, (payload, response.text)
        assert message in response.json()["error"], (message, response.json())
    with ActionClient(url) as client, pytest.raises(ActionServerError, match="422: Unknown unnorm_key 'nope'") as info:
        client.act(GOOD["image"], "wave", unnorm_key="nope")
    assert info.value.status_code == 422


class FakeModel:
    """Records its batches; `gate` (if set) holds the first batch until released; `fail` raises in run_batch."""

    model_id, norm_stats = "fake", {"only": {"action": {"q01": [0.0, 0.0], "q99": [1.0, 1.0]}}}

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate, self.fail, self.batches, self.entered = gate, fail, [], threading.Event()

    def prepare(self, image, instruction, unnorm_key) -> Prepared:
        return Prepared(group_key=len(instruction), unnorm_key=unnorm_key, inputs=instruction)

    def run_batch(self, batch):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        self.batches.append([p.inputs for p in batch])
        return [np.full(2, len(p.inputs), np.float64) for p in batch]


def test_batcher_groups_by_key_and_respects_max_batch_size():
    gate = threading.Event()
    fake = FakeModel(gate)
    batcher = RequestBatcher(fake, max_batch_size=4, batch_window_ms=50)
    batcher.start()
    try:
        first = batcher.submit(fake.prepare(None, "x", "only"))
        assert fake.entered.wait(10)  # the worker is busy: the next requests queue up together
        texts = ["aa", "bb", "ccc", "dd", "eee", "fff"]
        futures = [batcher.submit(fake.prepare(None, text, "only")) for text in texts]
        gate.set()
        results = [future.result(10) for future in [first, *futures]]
    finally:
        batcher.stop()
    assert [r[0] for r in results] == [1, 2, 2, 3, 2, 3, 3]
    assert fake.batches == [["x"], ["aa", "bb", "dd"], ["ccc"], ["eee", "fff"]]  # 4 at most, grouped by length
    assert list(batcher.batch_sizes) == [1, 3, 1, 2]


def test_model_errors_answer_500_with_a_message_and_log_the_traceback(caplog):
    logger.addHandler(caplog.handler)
    try:
        with serving(create_app(FakeModel(fail=True))) as base_url, ActionClient(base_url) as client:
            with pytest.raises(ActionServerError, match="500: RuntimeError: CUDA out of memory") as info:
                client.act(GOOD["image"], "wave")
    finally:
        logger.removeHandler(caplog.handler)
    assert info.value.status_code == 500
    assert any(r.levelno == logging.ERROR and r.exc_info and "POST /act failed" in r.message for r in caplog.records)


def test_concurrent_requests_share_batched_forwards(model, monkeypatch):
    texts, keys = [*SAME_LENGTH, "wave"], ["demo_a", "demo_b", "demo_a", "demo_b"]
    requests = [(_image(10 + i), texts[i], keys[i]) for i in range(4)]
    assert len({model.prepare(*r).group_key for r in requests[:3]}) == 1  # equal prompt lengths
    expected = [_reference(model, *r) for r in requests]
    calls: list[int] = []
    original = model.vla.generate_action_token_ids

    def counting(input_ids, pixel_values, num_tokens):
        calls.append(input_ids.shape[0])
        return original(input_ids, pixel_values, num_tokens)

    monkeypatch.setattr(model.vla, "generate_action_token_ids", counting)
    app = create_app(model, max_batch_size=4, batch_window_ms=2000)
    with serving(app) as base_url, ActionClient(base_url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda r: client.act(r[0], r[1], unnorm_key=r[2]), requests))
    for answer, reference in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(answer, reference)
    assert len(calls) < len(requests) and max(calls) >= 2, calls  # "wave" (shorter prompt) is its own batch
    assert sorted(app.state.batcher.batch_sizes) == sorted(calls)


def test_hf_adapter_calls_processor_then_predict_action(tmp_path, monkeypatch):
    """The Hugging Face path against the remote-code interface (facts §10.2-10.4: `processor(prompt, image)`, then
    `predict_action(**inputs, unnorm_key=, do_sample=False)`, `[B, A]` for a batch), with stand-ins for the classes."""
    prompts, calls = [], []

    def processor(prompt, image):
        prompts.append(prompt)
        length = 3 if "drawer" in prompt else 4
        return {"input_ids": torch.ones(1, length, dtype=torch.long), "pixel_values": torch.zeros(1, 6, 4, 4)}

    class Model(torch.nn.Module):
        config = type("Config", (), {"llm_backbone_id": "tiny-llama", "model_id": MODEL_ID})()
        norm_stats: ClassVar[dict] = {"from_config": {}}

        def predict_action(self, input_ids, pixel_values, unnorm_key, do_sample):
            calls.append((input_ids.shape[0], pixel_values.dtype, unnorm_key, do_sample))
            actions = np.stack([np.arange(7.0) + i for i in range(input_ids.shape[0])])
            return actions[0] if actions.shape[0] == 1 else actions

    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", lambda path, trust_remote_code: processor)
    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained",
                        lambda path, trust_remote_code, dtype: Model())
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(NORM_STATS))
    hf = HFActionModel(tmp_path, "cpu")
    assert hf.model_id == MODEL_ID and sorted(hf.norm_stats) == ["demo_a", "demo_b"]  # the directory's stats win
    with serving(create_app(hf)) as base_url, ActionClient(base_url) as client:
        np.testing.assert_array_equal(client.act(_image(5), "Open the Drawer", unnorm_key="demo_b"), np.arange(7.0))
    assert prompts == ["In: What action should the robot take to open the drawer?\nOut:"]
    assert calls == [(1, torch.float32, "demo_b", False)]
    batch = [hf.prepare(_image(i), "open the drawer", "demo_a") for i in range(2)]
    assert batch[0].group_key == batch[1].group_key != hf.prepare(_image(0), "wave", "demo_a").group_key
    assert [a.tolist() for a in hf.run_batch(batch)] == [list(range(7)), list(range(1, 8))]
    Model.config.vla_prompt_template = "USER: {instruction}? ASSISTANT:"
    HFActionModel(tmp_path, "cpu").prepare(_image(0), "Wave", "demo_a")
    assert prompts[-1] == "USER: wave? ASSISTANT:"


def test_hf_dir_serves_the_exported_model_in_batches(run_dir, model, tmp_path, monkeypatch):
    """`--hf_dir`: the run directory exported by `vla_train.export.hf`, loaded with transformers (remote code),
    answers equal the native `predict_action`; concurrent equal-length requests share one `predict_action` call."""
    from vla_train.export.hf import export_hf

    hf = load_action_model(DeployConfig(hf_dir=export_hf(run_dir, tmp_path / "hf"), device="cpu"))
    assert isinstance(hf, HFActionModel) and hf.model_id == MODEL_ID and sorted(hf.norm_stats) == sorted(NORM_STATS)
    requests = [(_image(20), SAME_LENGTH[0], "demo_b"), (_image(21), SAME_LENGTH[1], "demo_b"),
                (_image(22), "wave", "demo_b")]
    expected = [_reference(model, *r) for r in requests]
    batch_sizes: list[int] = []
    original = hf.model.predict_action

    def counting(input_ids, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        return original(input_ids, **kwargs)

    monkeypatch.setattr(hf.model, "predict_action", counting)
    with (serving(create_app(hf, max_batch_size=3, batch_window_ms=2000)) as base_url,
          ActionClient(base_url, timeout=60) as client, ThreadPoolExecutor(3) as pool):
        answers = list(pool.map(lambda r: client.act(r[0], r[1], unnorm_key=r[2]), requests))
    for answer, reference in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(answer, reference)
    assert len(batch_sizes) < len(requests) and max(batch_sizes) == 2, batch_sizes


def test_config_validation_and_checkpoint_choice(run_dir, tmp_path):
    for cfg, message in [(DeployConfig(), "exactly one of"), (DeployConfig(run_dir=run_dir, hf_dir=run_dir), "exactly"),
                         (DeployConfig(hf_dir=run_dir, step=3), "only apply to --run_dir"),
                         (DeployConfig(run_dir=run_dir, max_batch_size=0), "max_batch_size must be >= 1"),
                         (DeployConfig(run_dir=run_dir, batch_window_ms=-1), "batch_window_ms must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            validate_deploy_config(cfg)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in ["step-000010-epoch-00-loss=0.5000.pt", "step-000020-epoch-01-loss=inf.pt"]:
        (checkpoints / name).touch()
    assert find_checkpoint(tmp_path).name.startswith("step-000020")  # no latest-checkpoint.pt: the newest
    assert find_checkpoint(tmp_path, 10).name.startswith("step-000010")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 30.*step-000010.*step-000020"):
        find_checkpoint(tmp_path, 30)
    assert find_checkpoint(run_dir).name == "latest-checkpoint.pt"


def test_deploy_script_serves_a_run_directory(run_dir, model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "vla-scripts/deploy.py", "--run_dir", str(run_dir), "--port", str(port),
               "--device", "cpu", "--batch_window_ms", "1", "--max_image_size", "640", "--max_body_mb", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with ActionClient(f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    health = client.health()
                    break
                except ConnectionError:
                    assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
                    time.sleep(0.2)
            assert health["unnorm_keys"] == ["demo_a", "demo_b"]
            assert health["max_image_size"] == 640 and health["max_body_bytes"] == 3 << 20  # the limit options
            image = _image(6)
            np.testing.assert_array_equal(client.act(image, "wipe the table", unnorm_key="demo_a"),
                                          _reference(model, image, "wipe the table", "demo_a"))
            with pytest.raises(ActionServerError, match=r"413: .*shape \(48, 641, 3\).*--max_image_size"):
                client.act(_image(7, 48, 641), "wipe the table", unnorm_key="demo_a")
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    # uvicorn shuts down gracefully (lifespan included), then re-raises the SIGTERM it caught
    assert process.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert f"Serving {MODEL_ID}" in output and "Application shutdown complete" in output
    assert "Limits: request body 3145728 bytes (--max_body_mb), images 640x640 (--max_image_size)" in output
