"""Action-chunk policies (OpenVLA-OFT) behind the action server (`vla_train.export.server`): several cameras, proprio,
and the whole chunk `[H, A]` per request.

Payload (json-numpy, or the `{"encoded": ...}` form, as for OpenVLA), for a policy with cameras `[c_0, c_1, ...]`
(`GET /health` lists them under `policy`):
- the images, either `"image"` (camera `c_0`) plus `"<c_i>_image"` for every other camera (e.g. `"wrist_image"`;
  ALOHA: `"left_wrist_image"`, `"right_wrist_image"`), or `"images"`: a list of them in camera order. Each is a uint8
  `[H, W, 3]` array, bounded by the server's `--max_image_size` / `--max_body_mb` like `"image"`;
- `"instruction"`: str; `"unnorm_key"`?: str;
- `"proprio"`: the raw robot state, a list of `P` floats (or a 1-D array), required when the policy reads proprio;
- `"seed"`?: int (default 0), the diffusion head's noise seed (as `predict_action(seed=)`).
Answer: the un-normalized chunk as a JSON nested list `[[a_1 ... a_A] x H]` (float64 values, exactly representable;
a JSON string holding it when the request was `{"encoded": ...}`). A missing camera image or proprio is answered 400
naming the field; malformed values 422.

Batching: L1 requests of equal prompt length and dataset share one forward; diffusion requests run one at a time
(each draws its own seeded noise, so its chunk equals `predict_action`'s). Diffusion runs the policy's
`num_diffusion_steps_inference` DDIM steps (as the HF export's `predict_action` does by default).
"""

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vla_train.data.normalization import normalize_np
from vla_train.export.server_limits import PromptLimit, RequestError, prompt_limit_for, validate_payload
from vla_train.export.server_limits import _describe as describe
from vla_train.models.openvla import NormStats, unnormalize_actions
from vla_train.models.pi0.prompt import pi0_prompt_ids
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

CHUNK_PAYLOAD_HELP = ("expected {'image': uint8 [H, W, 3], '<camera>_image': uint8 [H, W, 3] for each other camera "
                      "(or 'images': [one per camera]), 'instruction': str, 'proprio'?: [P floats], 'unnorm_key'?: "
                      "str, 'seed'?: int}")


@dataclass(frozen=True)
class ChunkPolicy:
    """What a chunk request must carry: camera roles (in order), proprio width (0: none), chunk `[H, A]`."""

    cameras: tuple[str, ...]
    proprio_dim: int
    chunk_length: int
    action_dim: int
    head: str  # OFT's "l1" or "diffusion"; "flow" for π0's flow matching
    num_diffusion_steps: int = 50  # DDIM (π0: Euler) steps per chunk (the policy's inference steps)
    family: str = "oft"  # the policy family served ("oft", "vla-adapter", "pi0")

    @property
    def image_fields(self) -> list[str]:
        """Payload field of each camera: `image` for the first, `<role>_image` for the others."""
        return ["image", *(f"{role}_image" for role in self.cameras[1:])]

    def describe(self) -> dict[str, Any]:
        """`GET /health`'s `policy` entry."""
        return {"type": self.family, "head": self.head, "chunk_length": self.chunk_length, "action_dim": self.action_dim,
                "cameras": list(self.cameras), "image_fields": self.image_fields, "proprio_dim": self.proprio_dim,
                **({"num_diffusion_steps": self.num_diffusion_steps} if self.head != "l1" else {})}


@dataclass(frozen=True)
class ChunkRequest:
    """A validated chunk request: one uint8 `[H, W, 3]` image per camera, raw proprio `[P]` (or None)."""

    images: list[np.ndarray]
    instruction: str
    unnorm_key: str
    proprio: np.ndarray | None
    seed: int


def _camera_images(payload: dict[str, Any], policy: ChunkPolicy) -> list[Any]:
    """The payload's images in camera order (not yet type-checked), or a 400 naming the first missing field."""
    if "images" in payload:
        images = payload["images"]
        if not isinstance(images, list) or len(images) != len(policy.cameras):
            got = f"a list of {len(images)}" if isinstance(images, list) else type(images).__name__
            raise RequestError(f"'images' must be a list of {len(policy.cameras)} images, one per camera "
                               f"{list(policy.cameras)}; got {got}.", 400)
        return images
    for field in policy.image_fields:
        if field not in payload:
            raise RequestError(f"Missing field '{field}': this policy reads the cameras {list(policy.cameras)} "
                               f"(fields {policy.image_fields}, or 'images'); {CHUNK_PAYLOAD_HELP}.", 400)
    return [payload[field] for field in policy.image_fields]


def _proprio(payload: dict[str, Any], policy: ChunkPolicy) -> np.ndarray | None:
    """The raw proprio `[P]` (float64), None for a policy without proprio, or a 400 / 422 naming the problem."""
    if not policy.proprio_dim:
        return None
    if "proprio" not in payload:
        raise RequestError(f"Missing field 'proprio': this policy reads the robot state, a list of "
                           f"{policy.proprio_dim} floats; {CHUNK_PAYLOAD_HELP}.", 400)
    value = payload["proprio"]
    numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.number):
        numbers = True
    if not numbers or len(value) != policy.proprio_dim or not all(math.isfinite(float(v)) for v in value):
        raise RequestError(f"'proprio' must be a list of {policy.proprio_dim} finite floats; got "
                           f"{value!r:.200}.")
    return np.asarray(value, dtype=np.float64)


def validate_chunk_payload(payload: dict[str, Any], policy: ChunkPolicy, norm_stats: NormStats,
                           prompt_limit: PromptLimit | None, num_generated: int) -> ChunkRequest:
    """A decoded chunk payload -> `ChunkRequest`, or a RequestError naming the field (400 missing, 422 malformed);
    `num_generated` = the positions after the prompt (H*A slots + stop ids) for the prompt's character pre-check."""
    images = _camera_images(payload, policy)
    names = [f"images[{i}]" for i in range(len(images))] if "images" in payload else policy.image_fields
    for image, name in zip(images, names, strict=True):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                and image.shape[0] > 0 and image.shape[1] > 0):
            raise RequestError(f"'{name}' must be a uint8 array of shape [H, W, 3]; got {describe(image)}.")
    _, instruction, unnorm_key = validate_payload({**payload, "image": images[0]}, norm_stats)
    if prompt_limit is not None:
        prompt_limit.check_chars(instruction, num_generated)
    seed = payload.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RequestError(f"'seed' must be an integer in [0, 2**63); got {seed!r:.100}.")
    proprio = _proprio(payload, policy)
    if proprio is not None and "proprio" not in norm_stats[unnorm_key]:
        raise RequestError(f"Dataset {unnorm_key!r} has no proprio statistics; pick another 'unnorm_key'.")
    return ChunkRequest(list(images), instruction, unnorm_key, proprio, seed)


def _group_key(policy: ChunkPolicy, prompt_length: int, request: ChunkRequest) -> Any:
    """L1: requests of equal prompt length and dataset batch; diffusion: each request alone (its own noise)."""
    return (prompt_length, request.unnorm_key) if policy.head == "l1" else object()


class OFTActionModel:
    """A native chunk policy (`OFTVLM` or `VLAAdapterVLM`, from a run directory): same prompt ids, image transforms
    and proprio normalization as its `predict_action`, deterministic (L1) requests batched."""

    chunked = True

    def __init__(self, model: Any, policy: ChunkPolicy) -> None:
        self.model, self.policy = model.eval(), policy
        self.model_id, self.norm_stats = model.model_id, model.norm_stats
        self._tokenizer_lock = threading.Lock()
        self.num_generated, self.prompt_limit = self.prompt_budget()

    def prompt_budget(self) -> tuple[int, PromptLimit | None]:
        """The positions after the prompt (slots + stop ids) and the prompt-length limit they leave."""
        model, llm = self.model, self.model.llm_backbone
        prefix = len(self.policy.cameras) * model.num_patches + model.num_extra_prefix_tokens
        num_generated = model.num_action_slots + len(model.stop_token_ids)
        tokenizer, positions = llm.get_tokenizer(), getattr(llm.llm.config, "max_position_embeddings", None)
        return num_generated, prompt_limit_for(tokenizer, positions, prefix, fallback_max_length=llm.llm_max_length)

    def prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's token ids, as the model's `predict_action` builds them (OpenVLA's prompt prefix)."""
        llm = self.model.llm_backbone
        return vla_prompt_prefix_ids(llm.prompt_builder_fn, llm.get_tokenizer(), instruction)

    def prepare_chunk(self, request: ChunkRequest) -> "Any":
        from vla_train.export.server import Prepared  # the server module imports this one

        with self._tokenizer_lock:
            ids = self.prompt_ids(request.instruction)
        if self.prompt_limit is not None:
            self.prompt_limit.check_tokens(len(ids), self.num_generated)
        transform = self.model.vision_backbone.get_image_transform()
        pixels = [transform(Image.fromarray(image).convert("RGB")) for image in request.images]
        proprio = None
        if request.proprio is not None:
            stats = self.norm_stats[request.unnorm_key]["proprio"]
            proprio = torch.from_numpy(normalize_np(np.asarray(request.proprio, np.float32).reshape(-1), stats))
        return Prepared(group_key=_group_key(self.policy, len(ids), request), unnorm_key=request.unnorm_key,
                        inputs=(ids, pixels, proprio, request.seed))

    def run_batch(self, batch: list[Any]) -> list[np.ndarray]:
        """Prepared requests -> un-normalized chunks `[H, A]` (float64), one per request."""
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([p.inputs[0] for p in batch], dtype=torch.long, device=device)
        cameras = []
        for index in range(len(self.policy.cameras)):
            pixels = [p.inputs[1][index] for p in batch]
            cameras.append({k: torch.stack([x[k] for x in pixels]).to(device) for k in pixels[0]}
                           if isinstance(pixels[0], dict) else torch.stack(pixels).to(device))
        proprio = torch.stack([p.inputs[2] for p in batch]).to(device) if self.policy.proprio_dim else None
        generator = torch.Generator(device=device).manual_seed(batch[0].inputs[3])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks = self.model.predict_action_chunk(input_ids, torch.ones_like(input_ids, dtype=torch.bool), cameras,
                                                     proprio, generator=generator,
                                                     num_inference_steps=self.policy.num_diffusion_steps)
        stats = [self.norm_stats[p.unnorm_key]["action"] for p in batch]
        return [unnormalize_actions(chunk.float().cpu().numpy(), s) for chunk, s in zip(chunks, stats, strict=True)]


class Pi0ActionModel(OFTActionModel):
    """A native π0 policy (`Pi0VLM`): its prompt (`pi0_prompt_ids`, truncated to `max_token_len`, so no prompt
    limit), the same image transforms and proprio normalization as its `predict_action`; every request samples its
    own seeded noise (served alone, as OFT's diffusion head)."""

    def prompt_budget(self) -> tuple[int, PromptLimit | None]:
        return 0, None  # nothing is generated after the prompt, which is truncated to max_token_len

    def prompt_ids(self, instruction: str) -> list[int]:
        return pi0_prompt_ids(self.model.llm_backbone.get_tokenizer(), instruction, self.model.max_token_len)

    def run_batch(self, batch: list[Any]) -> list[np.ndarray]:
        """Prepared requests -> un-normalized chunks `[H, A]` (float64), each sampled with its own seed."""
        device = next(self.model.parameters()).device
        chunks = []
        for prepared in batch:
            ids, pixels, proprio, seed = prepared.inputs
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            generator = torch.Generator(device=device).manual_seed(seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                chunk = self.model.sample_actions(
                    torch.stack(pixels)[None].to(device), torch.ones(1, len(pixels), dtype=torch.bool, device=device),
                    input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                    None if proprio is None else proprio[None].to(device), generator, self.policy.num_diffusion_steps)
            stats = self.norm_stats[prepared.unnorm_key]["action"]
            chunks.append(unnormalize_actions(chunk[0].float().cpu().numpy(), stats))
        return chunks


def hf_chunk_policy(hf_dir: Path) -> ChunkPolicy | None:
    """The chunk policy an exported directory's `config.json` records (`oft`), or None (an OpenVLA export)."""
    oft = json.loads((Path(hf_dir) / "config.json").read_text()).get("oft")
    if not oft:
        return None
    return ChunkPolicy(tuple(oft["cameras"]), int(oft["proprio_dim"]), int(oft["chunk_length"]),
                       int(oft["action_dim"]), oft["head"], int(oft["num_diffusion_steps_inference"]))


class HFOFTActionModel:
    """An exported OFT directory: `processor(prompt, image)` for the ids and the first camera, the image processor
    for the others (channel-stacked in camera order), `model.predict_action(..., proprio=, seed=)`."""

    chunked = True

    def __init__(self, hf_dir: Path, device: str, policy: ChunkPolicy) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.hf_dir, self.device, self.policy = Path(hf_dir), torch.device(device), policy
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(self.hf_dir, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(self.hf_dir, trust_remote_code=True,
                                                                 dtype=self.dtype).to(self.device).eval()
        stats_path = self.hf_dir / "dataset_statistics.json"
        if stats_path.is_file():  # as for OpenVLA exports: the directory's statistics win over config.json's
            self.model.norm_stats = json.loads(stats_path.read_text())
        self.norm_stats: NormStats = dict(self.model.norm_stats or {})
        self.model_id = str(getattr(self.model.config, "model_id", None) or self.hf_dir.name)
        self.prompt_template = self.model.config.vla_prompt_template
        self.num_generated = policy.chunk_length * policy.action_dim + len(self.model.stop_token_ids)
        featurizer = self.model.vision_backbone.featurizer
        prefix = len(policy.cameras) * featurizer.patch_embed.num_patches + bool(policy.proprio_dim) + (
            policy.head == "diffusion")
        self.prompt_limit = prompt_limit_for(self.processor.tokenizer,
                                             self.model.config.text_config.max_position_embeddings, prefix,
                                             len(self.model.prompt_suffix_ids), self.model.config.llm_max_length)
        self._lock = threading.Lock()

    def prepare_chunk(self, request: ChunkRequest) -> Any:
        from vla_train.export.server import Prepared  # the server module imports this one

        prompt = self.prompt_template.replace("{instruction}", request.instruction.lower())
        with self._lock:
            inputs = self.processor(prompt, Image.fromarray(request.images[0]).convert("RGB"))
            others = [self.processor.image_processor(Image.fromarray(image).convert("RGB"),
                                                     return_tensors="pt")["pixel_values"]
                      for image in request.images[1:]]
        if self.prompt_limit is not None:
            self.prompt_limit.check_tokens(inputs["input_ids"].shape[-1], self.num_generated)
        pixel_values = torch.cat([inputs["pixel_values"], *others], dim=1)
        key = _group_key(self.policy, inputs["input_ids"].shape[-1], request)
        return Prepared(group_key=key, unnorm_key=request.unnorm_key,
                        inputs=(inputs["input_ids"], pixel_values, request.proprio, request.seed))

    @torch.inference_mode()
    def run_batch(self, batch: list[Any]) -> list[np.ndarray]:
        """Prepared requests -> un-normalized chunks `[H, A]` (float64), one per request."""
        input_ids = torch.cat([p.inputs[0] for p in batch]).to(self.device)
        pixel_values = torch.cat([p.inputs[1] for p in batch]).to(self.device, dtype=self.dtype)
        proprio = np.stack([p.inputs[2] for p in batch]) if self.policy.proprio_dim else None
        chunks = self.model.predict_action(input_ids, batch[0].unnorm_key, pixel_values=pixel_values,
                                           proprio=proprio, seed=batch[0].inputs[3])
        shape = (len(batch), self.policy.chunk_length, self.policy.action_dim)
        return list(np.asarray(chunks, np.float64).reshape(shape))
