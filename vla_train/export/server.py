"""The action server: `POST /act` (the reference deploy.py's payload, json-numpy encoded) and `GET /health`.

Payload (facts §10.3): `{"image": uint8 [H, W, 3], "instruction": str, "unnorm_key"?: str}` encoded with json-numpy,
or `{"encoded": "<that payload as a json-numpy string>"}`, answered double-encoded (a JSON string holding the
json-numpy action) as the reference does. Bad requests get a 4xx `{"error": "..."}` naming the problem (the reference
answered the bare string "error"); failures are 500 `{"error": "..."}`, logged with their traceback.

Batching: requests are validated and preprocessed (prompt ids, image transform) in the request handlers, then queued.
One worker thread owns the model: it takes the first queued request, lets others join for `batch_window_ms` (at most
`max_batch_size`), groups them by `Prepared.group_key` (prompt length and action dimension for a run directory) and
runs each group as one batched decoding.

Action-chunk policies (OpenVLA-OFT and VLA-Adapter run directories, OFT exports; `vla_train.export.server_oft`):
`/act` also takes the other cameras' images (`"wrist_image"`, ... or an `"images"` list), `"proprio"` (list of
floats) and `"seed"`, and answers the whole chunk `[H, A]` as a JSON nested list; see that module for the schema.
OpenVLA models are unchanged.

Limits (`vla_train.export.server_limits`): request bodies, images and prompts are bounded (413 / 422 with the limit and
the option that raises it), all checked before a request reaches the model thread.
"""

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import json_numpy
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from vla_train.config.deploy import DeployConfig, validate_deploy_config
from vla_train.config.policy import OFTPolicyConfig, Pi0PolicyConfig, VLAAdapterPolicyConfig, read_policy_config
from vla_train.export.hf import find_checkpoint
from vla_train.export.server_limits import (
    PromptLimit,
    RequestError,
    ServerLimits,
    action_dim,
    max_prompt_tokens,
    parse_payload,
    prompt_limit_for,
    read_body,
    validate_payload,
)
from vla_train.export.server_oft import (
    ChunkPolicy,
    HFOFTActionModel,
    OFTActionModel,
    Pi0ActionModel,
    hf_chunk_policy,
    validate_chunk_payload,
)
from vla_train.log import logger
from vla_train.models.llm import get_llm_backbone_spec
from vla_train.models.openvla import NormStats, OpenVLA, unnormalize_actions
from vla_train.models.prompts import (
    VLA_QUESTION_TEMPLATE,
    PurePromptBuilder,
    VicunaV15ChatPromptBuilder,
    get_prompt_builder_class,
)
from vla_train.models.run_dir import load_run_dir
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

__all__ = ["ActionModel", "HFActionModel", "HFOFTActionModel", "OFTActionModel", "OpenVLAActionModel", "Prepared",
           "RequestBatcher", "RequestError", "ServerLimits", "create_app", "find_checkpoint", "load_action_model",
           "load_run_dir_model", "serve"]


@dataclass
class Prepared:
    """One validated request turned into model inputs; requests with equal `group_key` can share a batch."""

    group_key: Hashable
    unnorm_key: str
    inputs: Any


class ActionModel(Protocol):
    """What the server needs from a model (run directory or exported Hugging Face directory); `prepare` raises a
    RequestError for a prompt over `prompt_limit` (an optional attribute: None or absent means no limit)."""

    model_id: str
    norm_stats: NormStats

    def prepare(self, image: np.ndarray, instruction: str, unnorm_key: str) -> Prepared: ...

    def run_batch(self, batch: list[Prepared]) -> list[np.ndarray]: ...


class OpenVLAActionModel:
    """A native `OpenVLA`, decoded in batches: same prompt ids, image transform and greedy decoding as
    `OpenVLA.predict_action`, over `[B, T]` prompts of equal length and equal action dimension."""

    def __init__(self, vla: OpenVLA) -> None:
        self.vla, self.model_id, self.norm_stats = vla.eval(), vla.model_id, vla.norm_stats
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers must not be called concurrently
        llm = vla.llm_backbone
        self.prompt_limit: PromptLimit | None = prompt_limit_for(
            llm.get_tokenizer(), getattr(llm.llm.config, "max_position_embeddings", None), vla.num_patches,
            fallback_max_length=llm.llm_max_length)

    def prepare(self, image: np.ndarray, instruction: str, unnorm_key: str) -> Prepared:
        llm, num_actions = self.vla.llm_backbone, action_dim(self.norm_stats, unnorm_key)
        with self._tokenizer_lock:
            ids = vla_prompt_prefix_ids(llm.prompt_builder_fn, llm.get_tokenizer(), instruction)
        if self.prompt_limit is not None:
            self.prompt_limit.check_tokens(len(ids), num_actions)
        pixels = self.vla.vision_backbone.get_image_transform()(Image.fromarray(image).convert("RGB"))
        return Prepared(group_key=(len(ids), num_actions), unnorm_key=unnorm_key, inputs=(ids, pixels))

    def run_batch(self, batch: list[Prepared]) -> list[np.ndarray]:
        device = next(self.vla.parameters()).device
        input_ids = torch.tensor([p.inputs[0] for p in batch], dtype=torch.long, device=device)
        pixels = [p.inputs[1] for p in batch]
        if isinstance(pixels[0], dict):
            pixel_values = {k: torch.stack([p[k] for p in pixels]).to(device) for k in pixels[0]}
        else:
            pixel_values = torch.stack(pixels).to(device)
        num_actions = action_dim(self.norm_stats, batch[0].unnorm_key)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            token_ids = self.vla.generate_action_token_ids(input_ids, pixel_values, num_actions).cpu().numpy()
        decode = self.vla.action_tokenizer.decode_token_ids_to_actions
        return [unnormalize_actions(decode(row), self.norm_stats[p.unnorm_key]["action"])
                for row, p in zip(token_ids, batch, strict=True)]


def hf_prompt_template(config: Any, hf_dir: Path) -> str:
    """The right-stripped VLA prompt of an exported model, with an `{instruction}` field: the export's
    `vla_prompt_template`, else its LLM's prompt format, else the reference deploy.py's rule (facts §10.3)."""
    if getattr(config, "vla_prompt_template", None):
        return config.vla_prompt_template
    builder_fn = VicunaV15ChatPromptBuilder if "v01" in str(hf_dir) else PurePromptBuilder
    llm_backbone_id = getattr(config, "llm_backbone_id", None)
    try:
        builder_fn = get_prompt_builder_class(get_llm_backbone_spec(llm_backbone_id).prompt_builder)
    except ValueError:
        logger.warning("%s: unknown llm_backbone_id %r; using the reference prompt %s.", hf_dir, llm_backbone_id,
                       builder_fn.__name__)
    builder = builder_fn("openvla")
    builder.add_turn("human", VLA_QUESTION_TEMPLATE)
    return builder.get_prompt()


def hf_prompt_limit(processor: Any, model: Any) -> PromptLimit | None:
    """The exported model's prompt limit: its tokenizer's `model_max_length` (else `config.llm_max_length`) and its
    LLM's `max_position_embeddings` less the image patches; the `prompt_suffix_ids` it appends count as prompt."""
    config = model.config
    featurizer = getattr(getattr(model, "vision_backbone", None), "featurizer", None)
    num_patches = getattr(getattr(featurizer, "patch_embed", None), "num_patches", 0)
    limit = prompt_limit_for(getattr(processor, "tokenizer", None),
                             getattr(getattr(config, "text_config", None), "max_position_embeddings", None),
                             num_patches, len(getattr(model, "prompt_suffix_ids", None) or []),
                             getattr(config, "llm_max_length", None))
    if limit is None:
        logger.warning("Found no context length in the exported model's tokenizer or config: prompts are not limited.")
    return limit


class HFActionModel:
    """An exported Hugging Face directory: `processor(prompt, image)`, then `model.predict_action(**inputs,
    unnorm_key=..., do_sample=False)` (facts §10.2-10.4) on batches of equal-length prompts that share an unnorm_key
    (the exported `predict_action` takes one key and unpadded prompts)."""

    def __init__(self, hf_dir: Path, device: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.hf_dir, self.device = Path(hf_dir), torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(self.hf_dir, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(self.hf_dir, trust_remote_code=True,
                                                                 dtype=self.dtype).to(self.device).eval()
        stats_path = self.hf_dir / "dataset_statistics.json"
        if stats_path.is_file():  # as the reference: the directory's statistics win over config.json's
            self.model.norm_stats = json.loads(stats_path.read_text())
        self.norm_stats: NormStats = dict(self.model.norm_stats or {})
        self.model_id = str(getattr(self.model.config, "model_id", None) or self.hf_dir.name)
        self.prompt_template = hf_prompt_template(self.model.config, self.hf_dir)
        self.prompt_limit = hf_prompt_limit(self.processor, self.model)
        self._lock = threading.Lock()

    def prepare(self, image: np.ndarray, instruction: str, unnorm_key: str) -> Prepared:
        prompt = self.prompt_template.replace("{instruction}", instruction.lower())
        with self._lock:
            inputs = self.processor(prompt, Image.fromarray(image).convert("RGB"))
        if self.prompt_limit is not None:
            self.prompt_limit.check_tokens(inputs["input_ids"].shape[-1], action_dim(self.norm_stats, unnorm_key))
        return Prepared(group_key=(unnorm_key, tuple(inputs["input_ids"].shape)), unnorm_key=unnorm_key,
                        inputs=inputs)

    @torch.inference_mode()
    def run_batch(self, batch: list[Prepared]) -> list[np.ndarray]:
        inputs = {key: torch.cat([p.inputs[key] for p in batch]) for key in batch[0].inputs}
        inputs = {key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
                  for key, value in inputs.items()}
        actions = self.model.predict_action(**inputs, unnorm_key=batch[0].unnorm_key, do_sample=False)
        return list(np.asarray(actions, np.float64).reshape(len(batch), -1))


_STOP = object()


class RequestBatcher:
    """One worker thread owns the model and serves queued requests in groups (see the module docstring)."""

    def __init__(self, model: ActionModel, max_batch_size: int = 8, batch_window_ms: float = 5.0) -> None:
        if max_batch_size < 1 or batch_window_ms < 0:
            raise ValueError(f"Need max_batch_size >= 1 and batch_window_ms >= 0, got {max_batch_size}, "
                             f"{batch_window_ms}.")
        self.model, self.max_batch_size, self.window_s = model, max_batch_size, batch_window_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # sizes of the latest model calls (monitoring, tests)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vla-action-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the requests still queued, join the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError("The action server is shutting down."))

    def submit(self, prepared: Prepared) -> concurrent.futures.Future:
        """Queue one prepared request; the future resolves to its action `[A]`."""
        if self._thread is None:
            raise RuntimeError("RequestBatcher.start() was not called (or the server is shutting down).")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((prepared, future))
        return future

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        """The first request plus those arriving within the window (at most max_batch_size); True when stopping."""
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._collect(first)
            groups: dict[Hashable, list[tuple]] = defaultdict(list)
            for prepared, future in batch:
                if future.set_running_or_notify_cancel():  # skip requests whose client went away
                    groups[prepared.group_key].append((prepared, future))
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[tuple]) -> None:
        try:
            actions = self.model.run_batch([prepared for prepared, _ in group])
            if len(actions) != len(group):
                raise RuntimeError(f"run_batch returned {len(actions)} actions for {len(group)} requests.")
            self.batch_sizes.append(len(group))
        except Exception as error:  # each waiting request answers 500 with this error
            for _, future in group:
                future.set_exception(error)
            return
        for (_, future), action in zip(group, actions, strict=True):
            future.set_result(action)


def _error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


def create_app(model: ActionModel, *, max_batch_size: int = 8, batch_window_ms: float = 5.0,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the batcher (`app.state.batcher`). `limits` bound request
    bodies and images (default `ServerLimits()`); the model's `prompt_limit`, if any, bounds prompts."""
    batcher = RequestBatcher(model, max_batch_size, batch_window_ms)
    limits = limits if limits is not None else ServerLimits()
    prompt_limit: PromptLimit | None = getattr(model, "prompt_limit", None)
    chunked = bool(getattr(model, "chunked", False))  # an action-chunk policy (server_oft): chunk payload and answer

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="vla-train action server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    def health() -> dict[str, Any]:
        dims = {key: len(stats["action"]["q01"]) for key, stats in sorted(model.norm_stats.items())}
        return {"status": "ok", "model_id": model.model_id, "unnorm_keys": list(dims),
                "action_dim": next(iter(set(dims.values()))) if len(set(dims.values())) == 1 else None,
                "action_dims": dims, "max_batch_size": max_batch_size, "batch_window_ms": batch_window_ms,
                "max_body_bytes": limits.max_body_bytes, "max_image_size": limits.max_image_size,
                "max_prompt_tokens": max_prompt_tokens(prompt_limit, model.norm_stats),
                **({"policy": model.policy.describe()} if chunked else {})}

    @app.post("/act")
    async def act(request: Request) -> Response:
        try:
            payload, double_encoded = parse_payload(await read_body(request, limits), limits)
            if chunked:
                chunk_request = validate_chunk_payload(payload, model.policy, model.norm_stats, prompt_limit,
                                                       model.num_generated)
                prepared = await run_in_threadpool(model.prepare_chunk, chunk_request)
            else:
                image, instruction, unnorm_key = validate_payload(payload, model.norm_stats, prompt_limit)
                prepared = await run_in_threadpool(model.prepare, image, instruction, unnorm_key)
            action = await asyncio.wrap_future(batcher.submit(prepared))
        except RequestError as error:
            logger.info("Rejected a request (%d): %s", error.status_code, error)
            return _error(error.status_code, str(error))
        except Exception as error:
            logger.exception("POST /act failed")
            return _error(500, f"{type(error).__name__}: {error}")
        body = json.dumps(np.asarray(action).tolist()) if chunked else json_numpy.dumps(np.asarray(action))
        return Response(json.dumps(body) if double_encoded else body, media_type="application/json")

    return app


def load_run_dir_model(run_dir: Path, *, step: int | None = None, device: str = "cpu",
                       llm_hf_dir: Path | None = None) -> OpenVLAActionModel | OFTActionModel:
    """A run directory's checkpoint as its policy's model (an OpenVLA, or an OFT chunk policy) with its
    `dataset_statistics.json`, on `device`, in eval mode."""
    stats_path = Path(run_dir) / "dataset_statistics.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} does not exist: a served VLA needs its dataset statistics to "
                                "un-normalize actions (training writes them into the run directory).")
    vla = load_run_dir(Path(run_dir), vla=True, norm_stats=json.loads(stats_path.read_text()),
                       llm_hf_dir=llm_hf_dir, inference_mode=True, checkpoint=find_checkpoint(Path(run_dir), step))
    policy = read_policy_config(run_dir)
    if isinstance(policy, Pi0PolicyConfig):  # flow matching: each request's own seeded noise
        return Pi0ActionModel(vla.to(device), ChunkPolicy(tuple(policy.cameras), policy.proprio_dim,
                                                          policy.chunk_length, policy.action_dim, "flow",
                                                          policy.num_inference_steps, family="pi0"))
    if isinstance(policy, OFTPolicyConfig | VLAAdapterPolicyConfig):  # VLA-Adapter: deterministic, as OFT's L1 head
        chunk = ChunkPolicy(tuple(policy.cameras), policy.proprio_dim, policy.chunk_length, policy.action_dim,
                            getattr(policy, "head", "l1"), getattr(policy, "num_diffusion_steps_inference", 1))
        return OFTActionModel(vla.to(device), chunk)
    if policy.family != "openvla":
        raise ValueError(f"{run_dir} trains the {policy.family!r} policy; the server serves 'openvla', 'oft', "
                         "'vla-adapter' and 'pi0'.")
    return OpenVLAActionModel(vla.to(device))


def load_action_model(cfg: DeployConfig) -> ActionModel:
    validate_deploy_config(cfg)
    if cfg.hf_dir is not None:
        chunk = hf_chunk_policy(cfg.hf_dir)
        return HFActionModel(cfg.hf_dir, cfg.device) if chunk is None else HFOFTActionModel(cfg.hf_dir, cfg.device,
                                                                                            chunk)
    return load_run_dir_model(cfg.run_dir, step=cfg.step, device=cfg.device, llm_hf_dir=cfg.llm_hf_dir)


def serve(cfg: DeployConfig) -> None:
    """Load the model and serve it with uvicorn until interrupted (what `vla-scripts/deploy.py` runs)."""
    import uvicorn

    limits = ServerLimits(max_image_size=cfg.max_image_size, max_body_mb=cfg.max_body_mb)
    limits.check_fits_largest_image()
    model = load_action_model(cfg)
    app = create_app(model, max_batch_size=cfg.max_batch_size, batch_window_ms=cfg.batch_window_ms, limits=limits)
    logger.info("Serving %s (unnorm keys %s) on http://%s:%d: POST /act, GET /health", model.model_id,
                sorted(model.norm_stats), cfg.host, cfg.port)
    logger.info("Limits: request body %d bytes (--max_body_mb), images %dx%d (--max_image_size), prompt tokens %s",
                limits.max_body_bytes, limits.max_image_size, limits.max_image_size,
                max_prompt_tokens(getattr(model, "prompt_limit", None), model.norm_stats))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
