"""The action server stays up under bad or hostile requests: prompts longer than the model's context, bodies and images
over the limits are answered 413/422 with the limit and the option that raises it, before the body is buffered, the
image decoded or the model thread reached; valid requests are still answered exactly afterwards."""

import json
import re
import socket
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import json_numpy
import numpy as np
import pytest

from tests.export import test_server
from tests.export.test_server import _image, _reference, serving
from vla_train.export.client import ActionClient, ActionServerError
from vla_train.export.server import HFActionModel, create_app
from vla_train.export.server_limits import (
    MIB,
    ContextBound,
    PromptLimit,
    RequestError,
    ServerLimits,
    chars_per_token,
    prompt_limit_for,
)
from vla_train.models.tokenizers import build_tiny_tokenizer
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

# the served tiny run directory and its model, and the check that no server thread is left running
run_dir, model, _no_leaked_threads = test_server.run_dir, test_server.model, test_server._no_leaked_threads
MAX_PROMPT = 512 - 7  # the tiny model: tokenizer model_max_length 512 (< 2048 positions - 64 patches), 7 actions


def _post(url: str, payload: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/act", content=json_numpy.dumps(payload), timeout=timeout)


def _prompt_length(served, instruction: str) -> int:
    llm = served.vla.llm_backbone
    return len(vla_prompt_prefix_ids(llm.prompt_builder_fn, llm.get_tokenizer(), instruction))


def test_prompt_limit_comes_from_the_model(model):
    limit = model.prompt_limit
    assert limit.max_tokens(7) == MAX_PROMPT and limit.max_tokens(3) == MAX_PROMPT + 4
    tight = prompt_limit_for(model.vla.llm_backbone.get_tokenizer(), 300, num_patches=64)  # positions bind
    assert tight.max_tokens(7) == 300 - 64 - 7
    with pytest.raises(RequestError, match=r"at most 229 tokens \(the LLM's max_position_embeddings 300, minus 64 for "
                                           r"the image patches, minus 7 for the generated action tokens\)"):
        tight.check_tokens(230, 7)
    tight.check_tokens(229, 7)
    unlimited = type("Tokenizer", (), {"model_max_length": int(1e30)})()  # transformers' "no limit" sentinel
    assert prompt_limit_for(unlimited, None, 64) is None
    assert prompt_limit_for(unlimited, None, 64, fallback_max_length=100).max_tokens(7) == 93


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_the_character_bound_never_rejects_a_prompt_that_fits(style):
    """`chars_per_token` bounds the characters any single token stands for, so `characters > limit * chars_per_token`
    proves the prompt too long."""
    tokenizer = build_tiny_tokenizer(style, model_max_length=512)
    bound = chars_per_token(tokenizer)
    assert bound is not None and all(len(tokenizer.decode([i])) <= bound for i in range(len(tokenizer)))
    rng = np.random.default_rng(0)
    for text in ["e\u0301" * 50, "  pick   up\n\n" * 20, "".join(map(chr, rng.integers(32, 0x3000, 400)))]:
        assert len(tokenizer(text, add_special_tokens=False).input_ids) * bound >= len(text)


def test_a_prompt_longer_than_the_context_is_rejected_before_the_model(model, monkeypatch):
    at_limit = next("a" * n for n in range(300, 600) if _prompt_length(model, "a" * n) == MAX_PROMPT)
    over = at_limit + "a"
    prepared: list[str] = []
    original = model.prepare
    monkeypatch.setattr(model, "prepare", lambda *args: prepared.append(args[1]) or original(*args))
    app = create_app(model)
    with serving(app) as url:
        response = _post(url, {"image": _image(1), "instruction": over, "unnorm_key": "demo_a"})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == (
            f"The prompt is {MAX_PROMPT + 1} tokens long; this model takes prompts of at most {MAX_PROMPT} tokens "
            "(the tokenizer's model_max_length 512, minus 7 for the generated action tokens). Shorten the instruction.")
        start = time.monotonic()
        huge = _post(url, {"image": _image(1), "instruction": "x" * 100_000, "unnorm_key": "demo_b"})
        assert huge.status_code == 422 and time.monotonic() - start < 10
        assert huge.json()["error"].startswith(f"The instruction has 100,000 characters, so its prompt has more than "
                                               f"{MAX_PROMPT} tokens")
        assert prepared == [over]  # the 100,000 characters were never tokenized
        assert list(app.state.batcher.batch_sizes) == []  # nothing reached the model thread
        image = _image(2)
        ok = _post(url, {"image": image, "instruction": at_limit, "unnorm_key": "demo_a"})
        assert ok.status_code == 200, ok.text
        np.testing.assert_array_equal(json_numpy.loads(ok.text), _reference(model, image, at_limit, "demo_a"))
        assert httpx.get(url + "/health").json()["max_prompt_tokens"] == {"demo_a": MAX_PROMPT, "demo_b": MAX_PROMPT}


def test_exported_model_rejects_a_prompt_longer_than_its_context(run_dir, tmp_path):
    from vla_train.export.hf import export_hf

    hf = HFActionModel(export_hf(run_dir, tmp_path / "hf"), "cpu")
    suffix = len(hf.model.prompt_suffix_ids)  # appended by predict_action: part of the prompt
    assert hf.prompt_limit.max_tokens(7) == MAX_PROMPT - suffix
    hf.prepare(_image(0), "wave", "demo_a")
    with pytest.raises(RequestError, match=rf"tokens long; this model takes prompts of at most {MAX_PROMPT - suffix} "):
        hf.prepare(_image(0), "a" * 600, "demo_a")


def _raw_post(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send raw HTTP/1.1 (headers as given) and read the answer; fails if the server waits for the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2])


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def _zeros(total: int, chunk: int = MIB) -> Iterator[bytes]:
    block = bytes(chunk)
    for _ in range(total // chunk):
        yield block


def test_a_body_over_the_limit_is_rejected_without_being_buffered(model):
    limits = ServerLimits(max_body_mb=1)
    with serving(create_app(model, limits=limits)) as url:
        port = int(url.rsplit(":", 1)[1])
        status, answer = _raw_post(port, "Content-Type: application/json\r\nContent-Length: 1000000000\r\n")
        assert status == 413 and answer["error"].startswith(
            "The request body is 1,000,000,000 bytes (Content-Length), over this server's limit of 1,048,576 bytes "
            "(1 MiB): send a smaller image (at most 2048x2048), or restart the server with a larger --max_body_mb.")
        tracemalloc.start()
        try:  # chunked (no Content-Length): 64 MiB, answered once the first MiB is passed, never held whole
            response = httpx.post(url + "/act", content=_zeros(64 * MIB), timeout=60)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert response.status_code == 413
        assert re.match(r"The request body is at least 1,\d{3},\d{3} bytes \(no Content-Length; reading stopped "
                        r"there\), over this server's limit of 1,048,576 bytes", response.json()["error"]), response.text
        assert peak < 16 * MIB, f"the server held {peak / MIB:.0f} MiB for a rejected body"
        with ActionClient(url, timeout=60) as client:
            with pytest.raises(ActionServerError, match=r"413: The request body is 1,\d{3},\d{3} bytes .*--max_body_mb"):
                client.act(_image(3, 512, 700), "wave", unnorm_key="demo_a")  # ~1.4 MB encoded
            _assert_still_serving(model, client)


def _assert_still_serving(served, client: ActionClient) -> None:
    requests = [(_image(30 + i), ["wave", "pick up the red block"][i % 2], ["demo_a", "demo_b"][i % 2])
                for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda r: client.act(r[0], r[1], unnorm_key=r[2]), requests))
    for answer, request in zip(answers, requests, strict=True):
        np.testing.assert_array_equal(answer, _reference(served, *request))


def _header_only(shape: list[int]) -> dict:
    """A json-numpy image header declaring `shape`, with 3 bytes of data (decoding it would fail with a 400)."""
    return {"__numpy__": "AAAA", "dtype": "|u1", "shape": shape}


def test_an_image_over_the_size_limit_is_rejected_before_decoding(model):
    with serving(create_app(model)) as url:  # default limits: 2048x2048
        health = httpx.get(url + "/health").json()
        assert health["max_image_size"] == 2048 and health["max_body_bytes"] == 48 * MIB + MIB
        for shape in ([10000, 10000, 3], [2049, 16, 3], [3, 4096, 4096], [1, 1, 3 * 2048 * 2048 + 1]):
            body = json.dumps({"image": _header_only(shape), "instruction": "wave", "unnorm_key": "demo_a"})
            for content in (body, json.dumps({"encoded": body})):
                response = httpx.post(url + "/act", content=content, timeout=30)
                assert response.status_code == 413, (shape, response.text)
                assert response.json()["error"] == (
                    f"The payload holds an array of shape {tuple(shape)}; this server accepts images of at most "
                    "2048x2048 pixels ([H, W, 3] uint8): resize the image, or restart the server with a larger "
                    "--max_image_size.")
        within = json.dumps({"image": _header_only([2048, 2048, 3]), "instruction": "wave", "unnorm_key": "demo_a"})
        response = httpx.post(url + "/act", content=within, timeout=30)
        assert response.status_code == 400 and "Could not decode the request body" in response.text  # size passed
    with serving(create_app(model, limits=ServerLimits(max_image_size=64))) as url:
        assert _post(url, {"image": _image(4, 65, 64), "instruction": "wave", "unnorm_key": "demo_a"}).status_code == 413
        with ActionClient(url, timeout=60) as client:
            with pytest.raises(ActionServerError, match=r"413: .*shape \(64, 80, 3\).*at most 64x64.*--max_image_size"):
                client.act(_image(5, 64, 80), "wave", unnorm_key="demo_a")
            image = _image(6, 64, 64)
            np.testing.assert_array_equal(client.act(image, "wave", unnorm_key="demo_b"),
                                          _reference(model, image, "wave", "demo_b"))


def test_limit_validation():
    with pytest.raises(ValueError, match="--max_image_size must be >= 1"):
        ServerLimits(max_image_size=0)
    with pytest.raises(ValueError, match="--max_body_mb must be > 0"):
        ServerLimits(max_body_mb=0)
    assert ServerLimits(max_image_size=100).max_body_bytes == 4 * 3 * 100 * 100 + MIB
    assert ServerLimits(max_body_mb=2.5).max_body_bytes == int(2.5 * MIB)
    limit = PromptLimit((ContextBound(100, "a context"),), chars_per_token=4)
    limit.check_chars("x" * 4 * 93, 7)
    with pytest.raises(RequestError, match=r"The instruction has 373 characters, so its prompt has more than 93"):
        limit.check_chars("x" * (4 * 93 + 1), 7)
