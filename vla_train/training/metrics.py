"""Training metrics: action metrics and throughput reduced across ranks, and a progress bar.

Unlike the reference (facts §9.6, §12 items 5, 11-13):
- every rank accumulates loss / action accuracy / L1 on device, with no GPU->CPU sync per step; on logging steps
  `reduce_metrics` packs every meter's sums and counts into ONE float64 tensor, all-reduces it once (collective: call
  on every rank) and turns the global sums into token-weighted means over the whole logging window;
- per-dataset metrics are reduced too, laid out by a fixed list of the mixture's dataset names, and only datasets
  seen in the window are logged (no stale values);
- trackers (jsonl, W&B) live in `trackers.py`.
"""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.vlm import IGNORE_INDEX
from vla_train.training.distributed import all_reduce, is_rank_zero
from vla_train.training.flops import FlopsModel

# === Reduction across ranks ===


class Reducible(Protocol):
    """A meter whose window sums travel in `reduce_metrics`' single all-reduce."""

    def pack(self, device: torch.device) -> torch.Tensor: ...  # [N] float64 sums on `device`

    def summarize(self, totals: list[float], world_size: int) -> dict[str, float]: ...

    def reset(self) -> None: ...


def reduce_metrics(*meters: Reducible, group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> dict[str, float]:
    """Sum every meter's packed window across ranks with ONE all-reduce, summarize, reset the meters.

    Collective: call on every rank, on logging steps only (the one GPU->CPU sync of a logging window).
    """
    device = device or getattr(meters[0], "device", torch.device("cpu"))
    packed = [meter.pack(device) for meter in meters]
    flat = torch.cat(packed)
    flat = all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    totals = flat.tolist()
    metrics: dict[str, float] = {}
    offset = 0
    for meter, part in zip(meters, packed, strict=True):
        metrics.update(meter.summarize(totals[offset:offset + part.numel()], world_size))
        offset += part.numel()
        meter.reset()
    return metrics


# === Action metrics ===

# Columns of ActionMetrics' accumulator: sums and counts that reduce by addition across micro-batches and ranks.
_LOSS_SUM, _LOSS_TOKENS, _CORRECT, _ACTION_TOKENS, _L1_SUM, _SAMPLES = range(6)
_NUM_COLUMNS = 6


class PerDatasetSums:
    """Sums and counts per logging window, overall and per dataset, accumulated on the device without syncs.

    Row 0 of the `[1 + D, C]` float64 accumulator is the overall figure, row `1 + i` dataset `dataset_names[i]`
    (the mixture's names: a fixed list, the same on every rank, so the packed layout matches across ranks).
    Subclasses name the C columns and `summarize` them; `prefix` names the overall metrics.
    """

    def __init__(self, dataset_names: Sequence[str], num_columns: int, device: torch.device | str = "cpu",
                 prefix: str = "VLA Train") -> None:
        self.device, self.prefix = torch.device(device), prefix
        self.dataset_names = list(dataset_names)
        self._row = {name: i + 1 for i, name in enumerate(self.dataset_names)}
        self._sums = torch.zeros(1 + len(self.dataset_names), num_columns, dtype=torch.float64, device=self.device)

    def _dataset_rows(self, dataset_names: Sequence[bytes | str], device: torch.device) -> torch.Tensor:
        rows = []
        for name in dataset_names:
            key = name.decode() if isinstance(name, bytes) else name
            if key not in self._row:
                raise ValueError(f"Dataset {key!r} is not in the mixture's dataset names {self.dataset_names}.")
            rows.append(self._row[key])
        rows_cpu = torch.tensor(rows, dtype=torch.long)
        if device.type == "cuda":  # pinned + non_blocking: a host->device copy that never waits for the GPU
            rows_cpu = rows_cpu.pin_memory()
        return rows_cpu.to(device, non_blocking=True)

    def _add_samples(self, per_sample: torch.Tensor, dataset_names: Sequence[bytes | str] | None) -> None:
        """Add `per_sample [B, C]` float64 to the overall row and, given the B dataset names, to their rows."""
        device = per_sample.device
        if self._sums.device != device:
            self._sums, self.device = self._sums.to(device), device
        self._sums[0] += per_sample.sum(dim=0)
        if dataset_names is not None and len(dataset_names) > 0 and self.dataset_names:
            if len(dataset_names) != per_sample.shape[0]:
                raise ValueError(f"Got {len(dataset_names)} dataset names for a batch of {per_sample.shape[0]}.")
            self._sums.index_add_(0, self._dataset_rows(dataset_names, device), per_sample)

    def _windows(self, totals: list[float]) -> Iterator[tuple[str, list[float]]]:
        """`(metric prefix, column sums)` of the overall row and of each dataset seen in the window (a dataset's
        last column must count its samples)."""
        columns = self._sums.shape[1]
        for row, name in enumerate([self.prefix, *self.dataset_names]):
            sums = totals[row * columns:(row + 1) * columns]
            if row == 0 or sums[-1] > 0:  # a dataset not seen in this window: log nothing for it
                yield name, sums

    def pack(self, device: torch.device) -> torch.Tensor:
        return self._sums.flatten().to(device)

    def reset(self) -> None:
        self._sums.zero_()

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Window means across ranks, then reset. Collective: call on every rank."""
        return reduce_metrics(self, group=group)


class ActionMetrics(PerDatasetSums):
    """Token-weighted loss, action-token accuracy and action L1, overall and per dataset (`PerDatasetSums`).

    `num_patches` is P, the vision tokens spliced after BOS.
    """

    def __init__(self, action_tokenizer: ActionTokenizer, dataset_names: Sequence[str], num_patches: int,
                 device: torch.device | str = "cpu", prefix: str = "VLA Train") -> None:
        super().__init__(dataset_names, _NUM_COLUMNS, device, prefix)
        self.num_patches = num_patches
        self.action_token_begin_idx = action_tokenizer.action_token_begin_idx
        self.vocab_end = action_tokenizer.vocab_end
        self._centers = torch.as_tensor(action_tokenizer.bin_centers, dtype=torch.float64, device=self.device)

    def _decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[...]` -> bin-centre actions `[...]` (float64), the ActionTokenizer's decoding as a gather."""
        index = (self.vocab_end - 1 - token_ids).clamp(0, self._centers.numel() - 1)
        return self._centers.take(index)

    @torch.no_grad()
    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor,
                   dataset_names: Sequence[bytes | str] | None = None) -> None:
        """Add one micro-batch of full logits (eval): `logits [B, T + P, V]`, text `labels [B, T]` (before patch
        splicing, -100 = ignored, on the logits' device), `dataset_names` B names (bytes or str). Asynchronous: no
        GPU->CPU sync."""
        num_patches = self.num_patches
        batch, length = labels.shape
        if logits.shape[:2] != (batch, length + num_patches):
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} plus "
                             f"{num_patches} patches.")
        labels = labels.to(logits.device, non_blocking=True)
        shifted = logits[:, num_patches:-1]  # position P + j predicts text token j + 1
        rows = torch.arange(batch, device=logits.device).repeat_interleave(length - 1)
        self._add_tokens(shifted.flatten(0, 1), labels[:, 1:].flatten(), rows, batch, dataset_names)

    @torch.no_grad()
    def accumulate_supervised(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, batch_size: int,
                              dataset_names: Sequence[bytes | str] | None = None) -> None:
        """Add one micro-batch of training output (`SupervisedCausalLMOutput`): `logits [N, V]` at the supervised
        positions only, the token each predicts `labels [N]`, its batch row `rows [N]` (in `[0, batch_size)`),
        `dataset_names` batch_size names. Equals `accumulate` on the full logits. Asynchronous: no GPU->CPU sync."""
        if logits.dim() != 2 or labels.shape != logits.shape[:1] or rows.shape != labels.shape:
            raise ValueError(f"Supervised logits {tuple(logits.shape)} need labels and rows of shape "
                             f"({logits.shape[0]},), got {tuple(labels.shape)} and {tuple(rows.shape)}.")
        self._add_tokens(logits, labels, rows, batch_size, dataset_names)

    def accumulate_output(self, output: Any, labels: torch.Tensor,
                          dataset_names: Sequence[bytes | str] | None = None) -> None:
        """Add a model output: a training output with supervised-only logits (it has `rows`), else full logits.
        `labels [B, T]` are the text labels of the batch."""
        if getattr(output, "rows", None) is not None:
            self.accumulate_supervised(output.logits.detach(), output.labels, output.rows, labels.shape[0],
                                       dataset_names)
        else:
            self.accumulate(output.logits.detach(), labels, dataset_names)

    def _add_tokens(self, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch: int,
                    dataset_names: Sequence[bytes | str] | None) -> None:
        """Add `M` predictions: `logits [M, V]`, `targets [M]` (-100 = ignored), `rows [M]` in `[0, batch)`."""
        device = logits.device
        token_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
        preds = logits.argmax(dim=-1)
        mask = (targets > self.action_token_begin_idx) & (targets < self.vocab_end)  # action tokens (facts §9.5)
        if self._centers.device != device:
            self._centers = self._centers.to(device)
        l1 = torch.where(mask, (self._decode(preds) - self._decode(targets)).abs(), 0.0)
        per_token = torch.stack([token_loss.double(), (targets != IGNORE_INDEX).double(),
                                 ((preds == targets) & mask).double(), mask.double(), l1,
                                 torch.zeros_like(l1)], dim=1)  # [M, 6]
        per_sample = torch.zeros(batch, _NUM_COLUMNS, dtype=torch.float64, device=device)
        per_sample[:, _SAMPLES] = 1.0
        per_sample.index_add_(0, rows.to(device), per_token)  # [B, 6]
        self._add_samples(per_sample, dataset_names)

    def summarize(self, totals: list[float], world_size: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, sums in self._windows(totals):
            if sums[_LOSS_TOKENS] > 0:
                metrics[f"{name}/Loss"] = sums[_LOSS_SUM] / sums[_LOSS_TOKENS]
            if sums[_ACTION_TOKENS] > 0:
                metrics[f"{name}/Action Token Accuracy"] = sums[_CORRECT] / sums[_ACTION_TOKENS]
                metrics[f"{name}/L1 Loss"] = sums[_L1_SUM] / sums[_ACTION_TOKENS]
        return metrics


# === Throughput ===


class ThroughputMeter:
    """Step time, data-wait fraction, samples/s, tokens/s, model TFLOP/s, MFU and peak device memory over a logging
    window, as global figures.

    Counts (samples, tokens, model FLOPs) are summed across ranks in `reduce_metrics`' all-reduce and divided by the
    mean window wall time, so rates are for the whole job; times are means over ranks. Token counts may be device
    tensors (e.g. `attention_mask.sum() + B * P`) and are added on device without a sync. The window is timed on the
    host between reductions; `pack` waits for the device first so the time queued GPU work takes is counted.

    With a `flops_model` (`vla_train.training.flops.FlopsModel`), `count(..., text_lengths=...)` adds the micro-batch's
    model FLOPs (from its unpadded text lengths, on device) and the window logs `Model TFLOPS per Device` (achieved
    model FLOP/s per device / 1e12); with `peak_flops_per_device` (FLOP/s) also `MFU` = achieved / peak. On CUDA the
    window logs `Peak Device Memory GiB`, the largest `torch.cuda.max_memory_allocated` over ranks (each rank adds its
    value at its rank's slot of the packed tensor, so the max travels in the same sum all-reduce); the peak is reset
    every window. Nothing of it on CPU.
    """

    def __init__(self, device: torch.device | str = "cpu", prefix: str = "VLA Train",
                 flops_model: FlopsModel | None = None, peak_flops_per_device: float | None = None) -> None:
        if peak_flops_per_device is not None and not peak_flops_per_device > 0:
            raise ValueError(f"peak_flops_per_device = {peak_flops_per_device} must be > 0 (FLOP/s), or None to "
                             "log no MFU.")
        self.device, self.prefix = torch.device(device), prefix
        self.flops_model, self.peak_flops_per_device = flops_model, peak_flops_per_device
        self._tokens = torch.zeros(3, dtype=torch.float64, device=self.device)  # [total, supervised, model FLOPs]
        self._window_start = self._window_end = time.perf_counter()
        self._steps, self._samples, self._wait = 0, 0, 0.0
        self._track_memory = self.device.type == "cuda"
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Wrap `next(data_iterator)`: the time inside counts as data wait."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait += time.perf_counter() - start

    def count(self, samples: int, tokens: torch.Tensor | int, supervised_tokens: torch.Tensor | int,
              text_lengths: torch.Tensor | None = None) -> None:
        """Add one micro-batch: `samples` sequences, `tokens` LLM positions, `supervised_tokens` labelled ones, and
        `text_lengths [B]` (unpadded text tokens per sample, `attention_mask.sum(dim=1)`) for the model FLOPs."""
        self._samples += samples
        self._tokens[0] += tokens
        self._tokens[1] += supervised_tokens
        if self.flops_model is not None and text_lengths is not None:
            self._tokens[2] += self.flops_model.batch_flops(text_lengths, supervised_tokens).to(self._tokens.device)

    def step(self) -> None:
        """Mark the end of one optimizer step."""
        self._steps += 1

    def _memory_slots(self) -> torch.Tensor:
        """`[world_size]` float64: this rank's peak allocated bytes at its rank's index, zeros elsewhere."""
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        slots = torch.zeros(world_size, dtype=torch.float64)
        slots[rank] = torch.cuda.max_memory_allocated(self.device)
        return slots

    def pack(self, device: torch.device) -> torch.Tensor:
        if self._tokens.device.type == "cuda":
            torch.cuda.synchronize(self._tokens.device)
        self._window_end = time.perf_counter()
        host = torch.tensor([self._steps, self._window_end - self._window_start, self._wait, self._samples],
                            dtype=torch.float64)
        if self._track_memory:
            host = torch.cat([host, self._memory_slots()])
        return torch.cat([host.to(device), self._tokens.to(device)])

    def summarize(self, totals: list[float], world_size: int) -> dict[str, float]:
        steps, elapsed, wait, samples = totals[:4]
        memory = totals[4:-3]
        tokens, supervised, flops = totals[-3:]
        if steps == 0 or elapsed <= 0:
            return {}
        mean_elapsed = elapsed / world_size
        metrics = {
            f"{self.prefix}/Step Time": elapsed / steps,  # (sum of elapsed) / (sum of steps) = mean per step
            f"{self.prefix}/Samples per Second": samples / mean_elapsed,
            f"{self.prefix}/Tokens per Second": tokens / mean_elapsed,
            f"{self.prefix}/Supervised Tokens per Second": supervised / mean_elapsed,
            f"{self.prefix}/Data Wait Fraction": wait / elapsed,
        }
        if flops > 0:
            per_device = flops / mean_elapsed / world_size  # achieved model FLOP/s per device
            metrics[f"{self.prefix}/Model TFLOPS per Device"] = per_device / 1e12
            if self.peak_flops_per_device is not None:
                metrics[f"{self.prefix}/MFU"] = per_device / self.peak_flops_per_device
        if memory:
            metrics[f"{self.prefix}/Peak Device Memory GiB"] = max(memory) / 2**30
        return metrics

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Window figures across ranks, then reset (its own small all-reduce; `reduce_metrics(action_metrics, self)`
        shares ActionMetrics' one). Collective: call on every rank."""
        return reduce_metrics(self, group=group)

    def reset(self) -> None:
        self._tokens.zero_()
        self._window_start = self._window_end
        self._steps, self._samples, self._wait = 0, 0, 0.0
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)


# === Progress bar ===


class ProgressBar:
    """A tqdm bar (step / total, loss, samples/s, ETA) on rank 0; every method is a no-op on the other ranks."""

    def __init__(self, total: int | None, initial: int = 0, is_main: bool | None = None,
                 desc: str = "VLA training") -> None:
        is_main = is_rank_zero() if is_main is None else is_main
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if is_main else None

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        """Move to global step `step` (call every step or on logging steps only); show loss and throughput from
        `metrics` (a reduced dict) when given."""
        if self._bar is None:
            return
        if metrics:
            postfix = {}
            if "VLA Train/Loss" in metrics:
                postfix["loss"] = f"{metrics['VLA Train/Loss']:.4f}"
            if "VLA Train/Samples per Second" in metrics:
                postfix["samples/s"] = f"{metrics['VLA Train/Samples per Second']:.1f}"
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
