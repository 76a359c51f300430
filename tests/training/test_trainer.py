"""The training loop between logging steps: metrics are reduced (the one device sync of a window) and the grad norm
turned into a float on logging steps only, and the run's result stays the same size however many steps it logs."""

import pickle
import sys
from types import SimpleNamespace

import numpy as np
import torch

from tests.conftest import build_tiny
from tests.training.test_accumulation import _items
from vla_train.config.policy import OpenVLAPolicyConfig
from vla_train.config.train import TrainConfig
from vla_train.models.freezing import freeze_backbones
from vla_train.policies.openvla import OpenVLAPolicy, TokenActionMetrics
from vla_train.training import trainer as trainer_module
from vla_train.training.distributed import DistributedContext
from vla_train.training.entry import RunSummary, _print_summary
from vla_train.training.parallelize import parallelize_vlm
from vla_train.training.trainer import Trainer, TrainResult


class _GradNorm:
    """Stands for the device grad-norm tensor: records the step whenever it is turned into a float."""

    def __init__(self, step: int, conversions: list[int]) -> None:
        self.step, self.conversions = step, conversions

    def __float__(self) -> float:
        self.conversions.append(self.step)
        return 1.0


class _Loader(list):
    """The session's batches (the stub step never draws one); records that the run stopped its prefetch thread."""

    def __init__(self, closed: list) -> None:
        super().__init__()
        self.closed = closed

    def close(self) -> None:
        self.closed.append(True)


class _StubPolicy(OpenVLAPolicy):
    """The `openvla` policy, with metrics that need no model when the stub session has none."""

    def __init__(self) -> None:
        super().__init__(OpenVLAPolicyConfig())

    def metrics(self, model, dataset_names, device, prefix="VLA Train"):
        if hasattr(model, "llm_backbone"):
            return super().metrics(model, dataset_names, device, prefix)
        tokenizer = SimpleNamespace(action_token_begin_idx=10, vocab_end=20, bin_centers=np.zeros(8))
        return TokenActionMetrics(tokenizer, dataset_names, model.num_patches, device, prefix)


def _session(tmp_path, total_steps: int, log_interval: int, saves: list, closed: list) -> SimpleNamespace:
    cfg = TrainConfig(trackers=(), log_interval=log_interval, save_interval=10**9)
    return SimpleNamespace(
        cfg=cfg, run_id="stub", run_dir=tmp_path, ctx=SimpleNamespace(is_main=False, device=torch.device("cpu")),
        start_step=0, start_epoch=0, total_steps=total_steps, steps_per_epoch=1000, grad_accumulation_steps=1,
        dataset=SimpleNamespace(plan=SimpleNamespace(specs=[]), state_dict=dict),
        vlm=SimpleNamespace(num_patches=4, train=lambda: None), policy=_StubPolicy(),
        loader=_Loader(closed),
        optimizer=None, ema=None, scheduler=SimpleNamespace(get_last_lr=lambda: [1e-4]),
        checkpoints=SimpleNamespace(save=lambda step, epoch, loss, *_, **__: saves.append((step, loss)),
                                    wait=lambda: None, close=lambda: None, last_save_s=None))


def _run(monkeypatch, tmp_path, total_steps: int, log_interval: int) -> tuple[TrainResult, dict[str, list]]:
    """Run the real loop with a stub step; returns the result and the steps that reduced, converted, saved."""
    seen: dict[str, list] = {"steps": [], "reduced": [], "converted": [], "saved": [], "loader_closed": []}

    def step(self, data_iter) -> _GradNorm:
        seen["steps"].append(len(seen["steps"]) + 1)
        return _GradNorm(seen["steps"][-1], seen["converted"])

    def reduce(*meters, **kwargs) -> dict[str, float]:
        seen["reduced"].append(seen["steps"][-1])
        return {"VLA Train/Loss": 10.0 - len(seen["reduced"])}

    monkeypatch.setattr(Trainer, "_train_step", step)
    monkeypatch.setattr(trainer_module, "reduce_metrics", reduce)
    monkeypatch.setattr(trainer_module, "flops_model_for_vlm", lambda vlm: None)  # the stub session has no model
    trainer = Trainer(_session(tmp_path, total_steps, log_interval, seen["saved"], seen["loader_closed"]))
    try:
        return trainer.run(), seen
    finally:
        trainer.finalize()


def test_metrics_are_reduced_and_the_grad_norm_read_on_logging_steps_only(process_group, monkeypatch, tmp_path):
    result, seen = _run(monkeypatch, tmp_path, total_steps=95, log_interval=10)
    logging_steps = [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]  # every 10th, and the last
    assert seen["steps"] == list(range(1, 96))
    assert seen["reduced"] == seen["converted"] == logging_steps
    assert (result.final_step, result.num_logged, result.first_loss, result.last_loss) == (95, 10, 9.0, 0.0)
    assert result.last_metrics["VLA Train/Step"] == 95 and result.last_metrics["VLA Train/Grad Norm"] == 1.0
    assert seen["saved"] == [(95, 0.0)]  # the checkpoint is named by the last logged loss
    assert seen["loader_closed"] == [True]  # the prefetch thread is stopped when the loop ends


def test_the_result_stays_bounded_however_many_steps_are_logged(process_group, monkeypatch, tmp_path):
    short, _ = _run(monkeypatch, tmp_path / "short", total_steps=20, log_interval=1)
    long, seen = _run(monkeypatch, tmp_path / "long", total_steps=2000, log_interval=1)
    assert len(seen["reduced"]) == long.num_logged == 2000
    assert abs(len(pickle.dumps(long)) - len(pickle.dumps(short))) < 32  # the step numbers' widths only


def test_the_default_log_interval_is_not_every_step():
    assert TrainConfig().log_interval == 10


def test_the_summary_reports_the_first_and_last_logged_loss(log_records):
    result = TrainResult(final_step=30, stopped_by_signal=False)
    for metrics in ({"VLA Train/Loss": 2.5}, {"VLA Train/Step": 20}, {"VLA Train/Loss": 0.75}, {"VLA Train/L1": 1}):
        result.record(metrics)
    assert (result.first_loss, result.last_loss, result.num_logged) == (2.5, 0.75, 4)
    assert result.last_metrics == {"VLA Train/L1": 1}
    _print_summary(RunSummary("runs/x", result, {"Held-out/Action Token Accuracy": 0.5}))
    assert "Loss: 2.5000 at the first logged step -> 0.7500 at the last" in log_records.text
    assert "Steps: 30" in log_records.text and "Held-out action-token accuracy: 0.500" in log_records.text


def _record_host_reads(monkeypatch, reads: list[str]) -> None:
    """Record every tensor-to-Python read (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`) made by `vla_train`
    code (on a GPU each one waits for the device), as `name device shape caller:line`."""
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("vla_train."):
                reads.append(f"{_name} {self.device.type} {tuple(self.shape)} {caller.f_code.co_name}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)


def test_a_real_step_reads_nothing_back_but_the_cpu_token_count(process_group, monkeypatch, tmp_path, rgb_image):
    """`_train_step` on the tiny VLA under `parallelize_vlm` (1 rank, bf16, 2 micro-batches): the grad norm comes back
    as a tensor, and the project's code reads back nothing but the token count (CPU counts, a CPU all-reduce)."""
    vlm = build_tiny("tiny-dinosiglip+tiny-llama", vla=True)
    items, collate = _items(vlm, rgb_image)
    freeze_backbones(vlm, "vla-train")
    ctx = DistributedContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    parallelize_vlm(vlm, ctx, strategy="full-shard", stage="vla-train")
    session = _session(tmp_path, total_steps=2, log_interval=10, saves=[], closed=[])
    session.vlm, session.ctx, session.grad_accumulation_steps = vlm, ctx, 2
    session.optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3)
    session.scheduler = torch.optim.lr_scheduler.LambdaLR(session.optimizer, lambda _: 1.0)
    trainer = Trainer(session)
    reads: list[str] = []
    try:
        _record_host_reads(monkeypatch, reads)
        for _ in range(2):
            grad_norm = trainer._train_step(iter([collate(items[:1]), collate(items[1:])]))
            assert isinstance(grad_norm, torch.Tensor)
        monkeypatch.undo()
    finally:
        trainer.signal.restore()
    # per step: `float(count)` of each CPU micro-batch's supervised tokens, then `.item()` of the all-reduced CPU total
    assert reads == ["__float__ cpu () loss_weight", "__float__ cpu () loss_weight",
                     "item cpu (1,) global_loss_weight"] * 2
    assert all(p.grad is None for p in vlm.parameters())
    assert float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm) > 0
