"""A small client for the action server (`vla_train.export.server`, `vla-scripts/deploy.py`).

    with ActionClient("http://127.0.0.1:8000") as client:
        action = client.act(image, "pick up the red block", unnorm_key="bridge_orig")  # float64 [A]

Requests are json-numpy encoded (the reference's payload); `encoded=True` sends the reference's
`{"encoded": "<json string>"}` form instead and decodes the double-encoded answer. A 4xx/5xx answer raises
`ActionServerError` with the server's message: 413 for a body or image over the server's limits, 422 for a bad payload
or a prompt longer than the model's context (`health()` reports `max_body_bytes`, `max_image_size` and
`max_prompt_tokens`).
"""

import json
from typing import Any

import httpx
import json_numpy
import numpy as np


class ActionServerError(RuntimeError):
    """The server answered with an error status; `status_code` and the server's `message`."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"Action server answered {status_code}: {message}")
        self.status_code, self.message = status_code, message


class ActionClient:
    """`ActionClient(url).act(image, instruction, unnorm_key=None) -> np.ndarray`; one HTTP connection, reused."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, encoded: bool = False) -> None:
        self.url = url.rstrip("/").removesuffix("/act")
        self.timeout, self.encoded = timeout, encoded
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def act(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        """The un-normalized action `[A]` for one uint8 `[H, W, 3]` image and instruction."""
        payload: dict[str, Any] = {"image": np.asarray(image), "instruction": instruction}
        if unnorm_key is not None:
            payload["unnorm_key"] = unnorm_key
        body = json_numpy.dumps(payload)
        if self.encoded:
            body = json.dumps({"encoded": body})
        text = self._post("/act", body)
        action = json_numpy.loads(json.loads(text) if self.encoded else text)
        if not isinstance(action, np.ndarray):
            raise ActionServerError(200, f"expected a json-numpy array, got {text[:200]!r}")
        return action

    def health(self) -> dict[str, Any]:
        """`GET /health`: model id, unnorm keys, action dimension."""
        return json.loads(self._request("GET", "/health"))

    def _post(self, path: str, body: str) -> str:
        return self._request("POST", path, content=body, headers={"Content-Type": "application/json"})

    def _request(self, method: str, path: str, **kwargs: Any) -> str:
        try:
            response = self._http.request(method, self.url + path, **kwargs)
        except httpx.TimeoutException as error:
            raise TimeoutError(f"No answer from {self.url}{path} within {self.timeout} s.") from error
        except httpx.TransportError as error:
            raise ConnectionError(f"Could not reach the action server at {self.url}{path}: {error}") from error
        if response.status_code >= 400:
            try:
                message = str(response.json()["error"])
            except (ValueError, KeyError, TypeError):
                message = response.text[:1000]
            raise ActionServerError(response.status_code, message)
        return response.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ActionClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
