"""Request parsing, validation and limits of the action server (`vla_train.export.server`): it must stay up under bad
or hostile requests.

- Body: a `Content-Length` over `ServerLimits.max_body_bytes` is answered 413 before the body is read; a body without
  one (chunked) is counted while it is read and answered 413 as soon as it passes the limit, so it is never held whole.
- Image: a json-numpy array whose header declares more than `max_image_size` pixels a side (or more elements than such
  an image) is answered 413 before its base64 text is decoded.
- Prompt: `PromptLimit` (from the served model's tokenizer and LLM) bounds the prompt in tokens: a character count
  that proves the prompt too long is answered before tokenizing, the token count before the image is transformed;
  neither reaches the model thread.
"""

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import json_numpy
import numpy as np
from starlette.requests import Request

from vla_train.config.deploy import DEFAULT_MAX_IMAGE_SIZE
from vla_train.log import logger
from vla_train.models.openvla import NormStats

MIB = 1 << 20
PAYLOAD_HELP = ("expected {'image': uint8 np.ndarray [H, W, 3], 'instruction': str, 'unnorm_key'?: str} encoded "
                "with json_numpy, or {'encoded': '<that payload as a json_numpy string>'}")


class RequestError(ValueError):
    """A client error, answered with `status_code` and `{"error": message}`."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def derived_max_body_mb(max_image_size: int) -> float:
    """The default body cap: 4x the raw bytes of the largest image (its json-numpy base64 is 4/3 of them) + 1 MiB."""
    return (4 * 3 * max_image_size**2 + MIB) / MIB


@dataclass(frozen=True)
class ServerLimits:
    """Request size limits; `max_body_mb=None` derives the body cap from `max_image_size` (49 MiB at 2048)."""

    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    max_body_mb: float | None = None

    def __post_init__(self) -> None:
        if self.max_image_size < 1:
            raise ValueError(f"--max_image_size must be >= 1 (pixels), got {self.max_image_size}.")
        if self.max_body_mb is not None and not self.max_body_mb > 0:
            raise ValueError(f"--max_body_mb must be > 0 (MiB), got {self.max_body_mb}.")

    @property
    def max_body_bytes(self) -> int:
        mb = self.max_body_mb if self.max_body_mb is not None else derived_max_body_mb(self.max_image_size)
        return int(mb * MIB)

    def check_fits_largest_image(self) -> None:
        """Warn when the body cap is too small for a json-numpy image of `max_image_size` pixels a side."""
        needed = 4 * self.max_image_size**2 + 1024  # base64 of its 3 * size**2 bytes, plus the rest of the payload
        if needed > self.max_body_bytes:
            logger.warning("--max_body_mb %.4g is too small for a %dx%d image (about %.4g MiB json-numpy encoded): "
                           "such requests will be answered 413.", self.max_body_bytes / MIB, self.max_image_size,
                           self.max_image_size, needed / MIB)

    def body_too_large(self, size: str) -> RequestError:
        limit = self.max_body_bytes
        return RequestError(f"The request body is {size}, over this server's limit of {limit:,} bytes "
                            f"({limit / MIB:.4g} MiB): send a smaller image (at most {self.max_image_size}x"
                            f"{self.max_image_size}), or restart the server with a larger --max_body_mb.", 413)

    def check_array_header(self, shape: Any) -> None:
        """413 when a json-numpy header declares an array larger than the largest accepted image (before decoding)."""
        if not isinstance(shape, list) or not all(isinstance(dim, int) for dim in shape):
            return  # malformed: json_numpy's decoder reports it (400)
        side = self.max_image_size
        if (len(shape) >= 2 and max(shape[:2]) > side) or math.prod(shape) > 3 * side * side:
            raise RequestError(f"The payload holds an array of shape {tuple(shape)}; this server accepts images of at "
                               f"most {side}x{side} pixels ([H, W, 3] uint8): resize the image, or restart the server "
                               "with a larger --max_image_size.", 413)


async def read_body(request: Request, limits: ServerLimits) -> bytearray:
    """The request body, or a 413 RequestError as soon as it is known to exceed `limits.max_body_bytes`."""
    limit, declared = limits.max_body_bytes, request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # h11 has already rejected a malformed Content-Length
        raise limits.body_too_large(f"{int(declared):,} bytes (Content-Length)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise limits.body_too_large(f"at least {len(body):,} bytes (no Content-Length; reading stopped there)")
    return body


def _array_header_hook(limits: ServerLimits) -> Callable[[dict], Any]:
    """A json `object_hook` that checks json-numpy array headers against `limits` (json_numpy decodes afterwards)."""
    def hook(obj: dict) -> Any:
        if "__numpy__" in obj:
            limits.check_array_header(obj.get("shape"))
        return obj
    return hook


def parse_payload(body: bytes | bytearray, limits: ServerLimits | None = None) -> tuple[dict[str, Any], bool]:
    """`(payload, double_encoded)` from a request body (json-numpy, or the reference's `{"encoded": ...}` form); with
    `limits`, arrays larger than the largest accepted image are rejected (413) before they are decoded."""
    hook = _array_header_hook(limits) if limits is not None else None
    try:
        payload = json_numpy.loads(body, object_hook=hook)
        double_encoded = isinstance(payload, dict) and "encoded" in payload
        if double_encoded:
            if set(payload) != {"encoded"} or not isinstance(payload["encoded"], str):
                raise RequestError(f"An 'encoded' payload must be exactly {{'encoded': <str>}}, got keys "
                                   f"{sorted(payload)}.", 400)
            payload = json_numpy.loads(payload["encoded"], object_hook=hook)
    except RequestError:
        raise
    except Exception as error:  # not JSON, or a broken json-numpy array
        raise RequestError(f"Could not decode the request body ({type(error).__name__}: {error}); "
                           f"{PAYLOAD_HELP}.", 400) from error
    if not isinstance(payload, dict):
        raise RequestError(f"The payload must be a JSON object, got {type(payload).__name__}; {PAYLOAD_HELP}.", 400)
    return payload, double_encoded


def resolve_unnorm_key(norm_stats: NormStats, unnorm_key: str | None) -> str:
    """The dataset whose statistics un-normalize the action (`OpenVLA` rules, facts §4.8), or a RequestError."""
    known = sorted(norm_stats)
    if unnorm_key is None:
        if len(known) != 1:
            raise RequestError(f"This model has statistics for several datasets {known}; pass 'unnorm_key'.")
        return known[0]
    if unnorm_key not in norm_stats:
        raise RequestError(f"Unknown unnorm_key {unnorm_key!r}; this model knows {known}.")
    return unnorm_key


def action_dim(norm_stats: NormStats, unnorm_key: str) -> int:
    """How many action tokens the model generates for dataset `unnorm_key`."""
    return len(norm_stats[unnorm_key]["action"]["q01"])


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    if isinstance(value, list | dict):
        return f"a JSON {type(value).__name__} of length {len(value)} (send numpy arrays with json_numpy)"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def validate_payload(payload: dict[str, Any], norm_stats: NormStats,
                     prompt_limit: "PromptLimit | None" = None) -> tuple[np.ndarray, str, str]:
    """`(image, instruction, unnorm_key)` of a decoded payload, or a RequestError (422) naming the problem; with
    `prompt_limit`, an instruction whose length in characters alone proves the prompt too long is rejected."""
    missing = [key for key in ("image", "instruction") if key not in payload]
    if missing:
        raise RequestError(f"Missing field(s) {missing}; {PAYLOAD_HELP}.")
    image, instruction, unnorm_key = payload["image"], payload["instruction"], payload.get("unnorm_key")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0):
        raise RequestError(f"'image' must be a uint8 array of shape [H, W, 3]; got {_describe(image)}.")
    if not isinstance(instruction, str) or not instruction.strip():
        got = repr(instruction) if isinstance(instruction, str) else _describe(instruction)
        raise RequestError(f"'instruction' must be a non-empty string; got {got}.")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise RequestError(f"'unnorm_key' must be a string; got {_describe(unnorm_key)}.")
    unnorm_key = resolve_unnorm_key(norm_stats, unnorm_key)
    if prompt_limit is not None:
        prompt_limit.check_chars(instruction, action_dim(norm_stats, unnorm_key))
    return image, instruction, unnorm_key


@dataclass(frozen=True)
class ContextBound:
    """One sequence-length bound: `prompt tokens + reserved + action tokens <= size`."""

    size: int
    what: str  # names `size`, e.g. "the tokenizer's model_max_length"
    reserved: int = 0
    reserved_what: str = ""  # names `reserved`, e.g. "the image patches"

    def max_prompt_tokens(self, num_actions: int) -> int:
        return self.size - self.reserved - num_actions

    def explain(self, num_actions: int) -> str:
        reserved = f", minus {self.reserved} for {self.reserved_what}" if self.reserved else ""
        return f"{self.what} {self.size}{reserved}, minus {num_actions} for the generated action tokens"


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt (in tokens, BOS included) the served model takes: the tightest of `bounds`.
    `chars_per_token` is the most characters one token can stand for (None: no character pre-check)."""

    bounds: tuple[ContextBound, ...]
    chars_per_token: int | None = None

    def max_tokens(self, num_actions: int) -> int:
        return min(bound.max_prompt_tokens(num_actions) for bound in self.bounds)

    def _why(self, num_actions: int) -> str:
        return min(self.bounds, key=lambda bound: bound.max_prompt_tokens(num_actions)).explain(num_actions)

    def check_chars(self, instruction: str, num_actions: int) -> None:
        """422 when the instruction alone has more characters than `max_tokens` tokens can stand for."""
        limit = self.max_tokens(num_actions)
        if self.chars_per_token is not None and len(instruction) > max(limit, 0) * self.chars_per_token:
            raise RequestError(f"The instruction has {len(instruction):,} characters, so its prompt has more than "
                               f"{limit} tokens (one token stands for at most {self.chars_per_token} characters); this "
                               f"model takes prompts of at most {limit} tokens ({self._why(num_actions)}). Shorten "
                               "the instruction.")

    def check_tokens(self, num_tokens: int, num_actions: int) -> None:
        """422 when a tokenized prompt is longer than `max_tokens`."""
        limit = self.max_tokens(num_actions)
        if num_tokens > limit:
            raise RequestError(f"The prompt is {num_tokens:,} tokens long; this model takes prompts of at most "
                               f"{limit} tokens ({self._why(num_actions)}). Shorten the instruction.")


def chars_per_token(tokenizer: Any) -> int | None:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level and metaspace entries
    spell their text one character per byte or character), times 4 when a normalizer may compose characters (NFC
    composes at most 4 code points into one; normalizers are assumed not to delete text). None when unknown."""
    try:
        longest = max(map(len, tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return longest * (1 if backend is not None and backend.normalizer is None else 4)


def prompt_limit_for(tokenizer: Any, max_position_embeddings: int | None, num_patches: int,
                     suffix_tokens: int = 0, fallback_max_length: int | None = None) -> PromptLimit | None:
    """The bounds a served model puts on its prompt: the tokenizer's `model_max_length` (the text context it was
    trained with: prompt + action tokens), and the LLM's `max_position_embeddings` (the patches spliced after BOS,
    the prompt and the action tokens); `suffix_tokens` are appended to the prompt after tokenizing."""
    bounds: list[ContextBound] = []
    text_length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(text_length, int) or text_length >= 10**18:  # transformers' "no limit" sentinel (1e30)
        text_length = fallback_max_length
    if text_length:
        bounds.append(ContextBound(text_length, "the tokenizer's model_max_length", suffix_tokens, "the prompt suffix"))
    if max_position_embeddings:
        reserved = "the image patches" + (" and the prompt suffix" if suffix_tokens else "")
        bounds.append(ContextBound(max_position_embeddings, "the LLM's max_position_embeddings",
                                   num_patches + suffix_tokens, reserved))
    return PromptLimit(tuple(bounds), chars_per_token(tokenizer)) if bounds else None


def max_prompt_tokens(prompt_limit: PromptLimit | None, norm_stats: NormStats) -> dict[str, int] | None:
    """`{unnorm_key: longest prompt in tokens}` for `GET /health` (None: the model states no limit)."""
    if prompt_limit is None:
        return None
    return {key: prompt_limit.max_tokens(action_dim(norm_stats, key)) for key in sorted(norm_stats)}
