"""Action metrics vs numpy, one all-reduce across 2 gloo ranks, throughput, trackers (jsonl, W&B offline), progress."""

import inspect
import json
import os
import re
import sys
import tempfile
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import batch_pixels, build_tiny
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.vlm import IGNORE_INDEX
from vla_train.training import metrics as metrics_module
from vla_train.training import trackers as trackers_module
from vla_train.training.distributed import free_port
from vla_train.training.flops import FlopsModel
from vla_train.training.metrics import ActionMetrics, ProgressBar, ThroughputMeter, reduce_metrics
from vla_train.training.trackers import JSONLinesTracker, make_trackers, wandb_run_id

VOCAB, PATCHES, LENGTH = 300, 3, 12
MIXTURE = ["bridge", "fractal", "libero", "unused"]
# Per sample: 1e6 + 1e3 S + 10 S^2 FLOPs, S = text tokens + 4 patches.
FLOPS = FlopsModel(per_sample=1e6, per_token=1e3, per_token_pair=10.0, num_patches=4, per_supervised_token=50.0)
PEAK = 1e9  # FLOP/s per device


class _Tokenizer:
    vocab_size = VOCAB


def _tokenizer() -> ActionTokenizer:
    return ActionTokenizer(_Tokenizer())  # action ids 44..299, begin idx 43


def _batch(seed: int, batch: int = 4):
    """Random logits [B, T+P, V] and labels [B, T]: prompt (-100), 7 action ids, a stop id (2), right padding."""
    rng = np.random.default_rng(seed)
    labels = np.full((batch, LENGTH), IGNORE_INDEX, dtype=np.int64)
    for b in range(batch):
        start = int(rng.integers(2, 4))
        labels[b, start:start + 7] = rng.integers(VOCAB - 256, VOCAB, size=7)
        labels[b, start + 7] = 2
    logits = rng.normal(size=(batch, LENGTH + PATCHES, VOCAB)).astype(np.float32)
    # Make about half of the predictions right: boost the ground truth at the predicting position.
    for b, j in zip(*np.nonzero(labels[:, 1:] != IGNORE_INDEX), strict=True):
        if rng.random() < 0.5:
            logits[b, PATCHES + j, labels[b, j + 1]] += 10.0
        elif rng.random() < 0.5:  # a near miss: the neighbouring action id
            logits[b, PATCHES + j, max(VOCAB - 256, labels[b, j + 1] - 1)] += 10.0
    return torch.from_numpy(logits), torch.from_numpy(labels)


def _numpy_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str], tok: ActionTokenizer) -> dict:
    shifted = logits[:, PATCHES:-1].astype(np.float64)
    gt = labels[:, 1:]
    logp = shifted - shifted.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    preds = shifted.argmax(-1)
    out = {}
    groups = {"VLA Train": np.ones(len(names), dtype=bool)}
    groups.update({n: np.array([x == n for x in names]) for n in sorted(set(names))})
    for key, rows in groups.items():
        g, p, lp = gt[rows], preds[rows], logp[rows]
        sup = g != IGNORE_INDEX
        nll = -np.take_along_axis(lp, np.where(sup, g, 0)[..., None], -1)[..., 0]
        mask = g > tok.action_token_begin_idx
        out[f"{key}/Loss"] = nll[sup].sum() / sup.sum()
        out[f"{key}/Action Token Accuracy"] = ((p == g) & mask).sum() / mask.sum()
        out[f"{key}/L1 Loss"] = np.abs(tok.decode_token_ids_to_actions(p[mask])
                                       - tok.decode_token_ids_to_actions(g[mask])).mean()
    return out


def _assert_metrics_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        rel = 1e-6 if key.endswith("/Loss") else 1e-9  # the loss is a float32 cross-entropy
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


def test_action_metrics_match_numpy_per_dataset():
    tok = _tokenizer()
    meter = ActionMetrics(tok, MIXTURE, PATCHES)
    (l1, y1), (l2, y2) = _batch(0), _batch(1, batch=3)
    n1, n2 = [b"bridge", b"fractal", b"bridge", b"libero"], [b"fractal", b"fractal", b"bridge"]
    assert meter.accumulate(l1, y1, n1) is None
    meter.accumulate(l2, y2, n2)
    got = meter.reduce()
    names = [n.decode() for n in n1 + n2]
    expected = _numpy_metrics(np.concatenate([l1.numpy(), l2.numpy()]), np.concatenate([y1.numpy(), y2.numpy()]),
                              names, tok)
    _assert_metrics_equal(got, expected)
    assert 0.2 < got["VLA Train/Action Token Accuracy"] < 0.8 and got["VLA Train/L1 Loss"] > 0
    assert not any(k.startswith("unused/") for k in got)
    # reset: the next window only logs what it saw (no stale per-dataset values)
    meter.accumulate(l2, y2, n2)
    got = meter.reduce()
    assert {k.split("/")[0] for k in got} == {"VLA Train", "fractal", "bridge"}
    _assert_metrics_equal(got, _numpy_metrics(l2.numpy(), y2.numpy(), [n.decode() for n in n2], tok))
    assert meter.reduce() == {}


def test_action_metrics_errors():
    meter = ActionMetrics(_tokenizer(), MIXTURE, PATCHES)
    logits, labels = _batch(0)
    with pytest.raises(ValueError, match="not in the mixture"):
        meter.accumulate(logits, labels, [b"bridge", b"nope", b"bridge", b"bridge"])
    with pytest.raises(ValueError, match="patches"):
        meter.accumulate(logits[:, 1:], labels)


def _supervised(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the training forward returns: logits `[N, V]` at the supervised positions, their targets and rows."""
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return logits[rows, PATCHES + positions], labels[rows, positions + 1], rows


def test_supervised_logits_give_exactly_the_full_logits_metrics():
    dense, sparse = ActionMetrics(_tokenizer(), MIXTURE, PATCHES), ActionMetrics(_tokenizer(), MIXTURE, PATCHES)
    for seed, names in ((0, [b"bridge", b"fractal", b"bridge", b"libero"]), (1, [b"fractal", b"libero", b"libero"])):
        logits, labels = _batch(seed, batch=len(names))
        dense.accumulate(logits, labels, names)
        sparse_logits, targets, rows = _supervised(logits, labels)
        assert sparse_logits.shape == ((labels[:, 1:] != IGNORE_INDEX).sum(), VOCAB) == (8 * len(names), VOCAB)
        sparse.accumulate_supervised(sparse_logits, targets, rows, len(names), names)
    expected = dense.reduce()
    assert sparse.reduce() == expected and len(expected) == 12  # 4 groups x (loss, accuracy, L1)


def test_accumulate_supervised_errors():
    meter = ActionMetrics(_tokenizer(), MIXTURE, PATCHES)
    logits, targets, rows = _supervised(*_batch(0))
    with pytest.raises(ValueError, match=r"Supervised logits \(32, 300\) need labels and rows of shape \(32,\)"):
        meter.accumulate_supervised(logits, targets[1:], rows, 4)
    with pytest.raises(ValueError, match="Got 3 dataset names for a batch of 4"):
        meter.accumulate_supervised(logits, targets, rows, 4, [b"bridge"] * 3)


def test_accumulate_never_syncs(monkeypatch):
    """No host read of a tensor in the accumulation path: inspection plus every host-read method made to raise."""
    for fn in (ActionMetrics.accumulate, ActionMetrics.accumulate_supervised, ActionMetrics.accumulate_output,
               ActionMetrics._add_tokens, ActionMetrics._decode, ThroughputMeter.count, FlopsModel.batch_flops):
        source = inspect.getsource(fn)
        for forbidden in (r"\.item\(", r"\.cpu\(", r"\.numpy\(", r"\.tolist\(", r"(?<![.\w])(float|int|bool)\("):
            assert not re.search(forbidden, source), (fn.__name__, forbidden)
    meter, throughput = ActionMetrics(_tokenizer(), MIXTURE, PATCHES), ThroughputMeter(flops_model=FLOPS)
    logits, labels = _batch(0)

    def boom(*_args, **_kwargs):
        raise AssertionError("GPU->CPU sync in the accumulation path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    meter.accumulate(logits, labels, [b"bridge"] * 4)
    meter.accumulate_supervised(*_supervised(logits, labels), 4, [b"bridge"] * 4)
    throughput.count(4, (labels != IGNORE_INDEX).sum() + 0, (labels != IGNORE_INDEX).sum(),
                     text_lengths=(labels != IGNORE_INDEX).sum(dim=1))
    monkeypatch.undo()
    assert meter.reduce()["VLA Train/Loss"] > 0


def test_loss_matches_the_model_loss(rgb_image):
    vlm = build_tiny("tiny-dinosiglip+tiny-llama", vla=True).eval()
    tok = vlm.action_tokenizer
    torch.manual_seed(1)
    input_ids = torch.randint(3, 500, (2, 14))
    input_ids[:, 0] = 1
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 6:13] = torch.tensor(tok.encode_to_ids(np.linspace(-1, 1, 7)))
    labels[:, 13] = 2
    input_ids[:, 6:] = labels[:, 6:]
    pixels = batch_pixels(vlm, rgb_image)
    pixels = {k: v.repeat(2, 1, 1, 1) for k, v in pixels.items()} if isinstance(pixels, dict) else pixels.repeat(2, 1,
                                                                                                                1, 1)
    with torch.no_grad():
        out = vlm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels, labels=labels)
    meter = ActionMetrics(tok, ["bridge"], vlm.num_patches)
    meter.accumulate(out.logits, labels, [])  # no dataset names: the overall figures only
    got = meter.reduce()
    assert got["VLA Train/Loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert set(got) == {"VLA Train/Loss", "VLA Train/Action Token Accuracy", "VLA Train/L1 Loss"}
    with torch.no_grad():  # training output: logits at the 16 supervised positions only, same metrics
        sparse = vlm.train()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                             labels=labels)
    assert sparse.logits.shape == (16, vlm.llm_backbone.llm.config.vocab_size)
    meter.accumulate_output(sparse, labels, [])
    assert meter.reduce() == pytest.approx(got, rel=1e-6)
    assert sparse.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)



def _rank_batches(rank: int):
    """Rank 0: two micro-batches, rank 1: one (uneven on purpose)."""
    b0, b1, b2 = _batch(10), _batch(11, batch=2), _batch(12, batch=3)
    n0 = [b"bridge", b"bridge", b"libero", b"bridge"]
    n1 = [b"libero", b"libero"]
    n2 = [b"fractal", b"bridge", b"fractal"]
    return [(b0, n0), (b1, n1)] if rank == 0 else [(b2, n2)]


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=2))
    try:
        meter = ActionMetrics(_tokenizer(), MIXTURE, PATCHES)
        throughput = ThroughputMeter(flops_model=FLOPS, peak_flops_per_device=PEAK)
        throughput._track_memory = True  # as on CUDA: rank r's peak is (r + 1) GiB
        torch.cuda.max_memory_allocated = lambda device=None: (rank + 1) * 2.0**30
        torch.cuda.reset_peak_memory_stats = lambda device=None: None
        for (logits, labels), names in _rank_batches(rank):
            meter.accumulate(logits, labels, names)
            throughput.count(len(names), labels.numel(), (labels != IGNORE_INDEX).sum(),
                             text_lengths=torch.full((len(names),), LENGTH))
        throughput.step()
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls.append(1)
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        result = reduce_metrics(meter, throughput)
        dist.all_reduce = real_all_reduce
        result["all_reduce_calls"] = len(calls)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_reduce_across_two_ranks_equals_concatenated_batches():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_reduce_worker, args=(free_port(), out_dir), nprocs=2, join=True)
        results = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]
    assert results[0] == results[1]
    got = results[0]
    assert got.pop("all_reduce_calls") == 1
    batches = _rank_batches(0) + _rank_batches(1)
    logits = np.concatenate([b[0][0].numpy() for b in batches])
    labels = np.concatenate([b[0][1].numpy() for b in batches])
    names = [n.decode() for b in batches for n in b[1]]
    throughput = {k: got.pop(k) for k in list(got) if any(word in k for word in (
        "Second", "Time", "Wait", "TFLOPS", "MFU", "Memory"))}
    _assert_metrics_equal(got, _numpy_metrics(logits, labels, names, _tokenizer()))
    assert {k.split("/")[0] for k in got} == {"VLA Train", "bridge", "libero", "fractal"}
    # global counts: 9 samples over both ranks; tokens/samples = LENGTH
    assert throughput["VLA Train/Tokens per Second"] / throughput["VLA Train/Samples per Second"] == pytest.approx(
        LENGTH)
    assert throughput["VLA Train/Supervised Tokens per Second"] / throughput[
        "VLA Train/Samples per Second"] == pytest.approx(8)
    # MFU x peak x world size / samples per second = FLOPs per sample (every sample has LENGTH text tokens)
    mfu = throughput["VLA Train/MFU"]
    assert mfu * PEAK * 2 / throughput["VLA Train/Samples per Second"] == pytest.approx(
        FLOPS.sample_flops(LENGTH, 8))
    assert throughput["VLA Train/Model TFLOPS per Device"] == pytest.approx(mfu * PEAK / 1e12)
    assert throughput["VLA Train/Peak Device Memory GiB"] == 2.0  # the max over ranks, in the same all-reduce


def test_throughput_meter_single_process(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 10.0, 11.0, 11.25, 20.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter()  # window starts at 0.0
    for _ in range(2):
        with meter.waiting_for_data():  # 1.0 -> 1.5, then 10.0 -> 11.0
            pass
        meter.count(8, torch.tensor(800), torch.tensor(64))
        meter.step()
    got = reduce_metrics(meter)  # window ends at 11.25
    assert got == pytest.approx({
        "VLA Train/Step Time": 11.25 / 2,
        "VLA Train/Samples per Second": 16 / 11.25,
        "VLA Train/Tokens per Second": 1600 / 11.25,
        "VLA Train/Supervised Tokens per Second": 128 / 11.25,
        "VLA Train/Data Wait Fraction": 1.5 / 11.25,
    })
    meter.step()
    assert reduce_metrics(meter)["VLA Train/Step Time"] == pytest.approx(20.0 - 11.25)  # next window starts at end


def test_mfu_equals_the_hand_formula(monkeypatch):
    clock = iter([0.0, 4.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_model=FLOPS, peak_flops_per_device=PEAK)  # window starts at 0.0
    meter.count(2, torch.tensor(20), torch.tensor(4), text_lengths=torch.tensor([3, 5]))  # S = 7 and 9
    meter.count(1, torch.tensor(10), torch.tensor(2), text_lengths=torch.tensor([6]))  # S = 10
    meter.step()
    got = reduce_metrics(meter)  # window ends at 4.0
    flops = (3 * 1e6) + 1e3 * (7 + 9 + 10) + 10.0 * (7**2 + 9**2 + 10**2) + 50.0 * (4 + 2)  # head: 6 supervised
    assert flops == 3_028_600
    assert got["VLA Train/Model TFLOPS per Device"] == pytest.approx(flops / 4.0 / 1e12)
    assert got["VLA Train/MFU"] == pytest.approx(flops / 4.0 / PEAK)  # 0.000757...
    assert "VLA Train/Peak Device Memory GiB" not in got  # CPU: no memory figure


def test_no_mfu_without_a_peak_or_a_flops_model():
    meter = ThroughputMeter(flops_model=FLOPS)  # CPU, no peak given
    meter.count(1, 10, 2, text_lengths=torch.tensor([6]))
    meter.step()
    got = reduce_metrics(meter)
    assert "VLA Train/MFU" not in got and "VLA Train/Peak Device Memory GiB" not in got
    assert got["VLA Train/Model TFLOPS per Device"] > 0
    plain = ThroughputMeter(peak_flops_per_device=PEAK)  # a peak but no FLOPs model: nothing to divide
    plain.count(1, 10, 2, text_lengths=torch.tensor([6]))
    plain.step()
    assert not any("MFU" in k or "TFLOPS" in k for k in reduce_metrics(plain))
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        ThroughputMeter(peak_flops_per_device=0.0)


def test_peak_memory_is_reset_every_window(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    meter = ThroughputMeter()
    meter._track_memory = True  # as on a CUDA device (the CPU meter tracks nothing)
    meter.step()
    assert reduce_metrics(meter)["VLA Train/Peak Device Memory GiB"] == 3.0
    assert len(resets) == 1  # after the window's reduction


def test_jsonl_tracker_appends_on_resume(tmp_path):
    for restart in range(2):
        tracker = JSONLinesTracker("my-run", tmp_path)
        tracker.write_hyperparameters({"lr": 2e-5, "restart": restart, "path": tmp_path})
        tracker.write(10 * (restart + 1), {"VLA Train/Loss": 1.5, "VLA Train/Action Token Accuracy": 0.25})
        tracker.finalize()
    header = [json.loads(line) for line in (tmp_path / "run-metrics.jsonl").read_text().splitlines()]
    assert header == [{"run_id": "my-run", "hparams": {"lr": 2e-5, "restart": r, "path": str(tmp_path)}}
                      for r in range(2)]
    lines = (tmp_path / "my-run.jsonl").read_text().splitlines()
    assert [json.loads(line)["VLA Train/Step"] for line in lines] == [10, 20]
    assert lines[0] == json.dumps({"VLA Train/Action Token Accuracy": 0.25, "VLA Train/Loss": 1.5,
                                   "VLA Train/Step": 10}, sort_keys=True)


def test_a_resumed_run_keeps_each_step_once_with_a_backup(tmp_path):
    first = JSONLinesTracker("my-run", tmp_path, start_step=0)
    for step in range(1, 6):  # the interrupted run logged steps 1..5; its last checkpoint was step 3
        first.write(step, {"VLA Train/Loss": float(step)})
    with open(tmp_path / "my-run.jsonl", "a") as file:
        file.write('{"VLA Train/Step": 6, "VLA Tr')  # cut off by the kill
    before = (tmp_path / "my-run.jsonl").read_text()
    resumed = JSONLinesTracker("my-run", tmp_path, start_step=3)
    for step in range(4, 7):
        resumed.write(step, {"VLA Train/Loss": 10.0 * step})
    records = [json.loads(line) for line in (tmp_path / "my-run.jsonl").read_text().splitlines()]
    assert [r["VLA Train/Step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["VLA Train/Loss"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
    (backup,) = tmp_path.glob("my-run.jsonl.before-resume-*")
    assert backup.read_text() == before
    JSONLinesTracker("my-run", tmp_path, start_step=6)  # nothing to drop: no second backup
    assert len(list(tmp_path.glob("my-run.jsonl.before-resume-*"))) == 1


def test_make_trackers_gates_rank_zero_and_validates(tmp_path):
    with pytest.raises(ValueError, match="tensorboard"):
        make_trackers(["jsonl", "tensorboard"], "r", tmp_path, {}, is_main=False)
    assert make_trackers(["jsonl", "wandb"], "r", tmp_path, {}, is_main=False) == []
    assert not any(tmp_path.iterdir())
    (tracker,) = make_trackers(["jsonl"], "r", tmp_path, {"a": 1}, is_main=True)
    assert isinstance(tracker, JSONLinesTracker)
    assert (tmp_path / "run-metrics.jsonl").exists()


def test_wandb_tracker_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    (tracker,) = make_trackers(["wandb"], "my-run", run_dir, {"lr": 1e-4}, project="vla-train-test", entity=None,
                               is_main=True)
    assert tracker.run.id == wandb_run_id(run_dir)
    tracker.write(1, {"VLA Train/Loss": 2.0})
    tracker.write(2, {"VLA Train/Loss": 1.0})
    tracker.finalize()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_run_id(run_dir)}"))
    assert len(offline_runs) == 1 and any(offline_runs[0].iterdir())
    assert wandb_run_id(run_dir) == wandb_run_id(str(run_dir) + "/") != wandb_run_id(tmp_path / "other")


def test_wandb_mode_without_key_is_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert trackers_module.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret-key\n")
    assert trackers_module.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers_module.wandb_mode() is None  # W&B reads the explicit WANDB_MODE itself


def test_progress_bar_rank_zero_only(capsys):
    bar = ProgressBar(total=10, initial=2, is_main=True)
    bar.update(3, {"VLA Train/Loss": 0.5, "VLA Train/Samples per Second": 12.0})
    assert bar._bar.n == 3 and "loss" in bar._bar.postfix
    bar.update(7)
    assert bar._bar.n == 7
    bar.close()
    silent = ProgressBar(total=10, is_main=False)
    silent.update(1, {"VLA Train/Loss": 0.5})
    silent.close()
    assert silent._bar is None


def test_wandb_logs_late_closed_loop_results_on_their_own_axis(tmp_path, monkeypatch):
    """Closed-loop results of step 10 arrive after step 30 was logged: W&B (whose steps may not decrease) gets them
    at step 30 with `Sim/Step` = 10, the x-axis defined for `Sim/*`."""
    import types

    calls = []

    class FakeRun:
        config = types.SimpleNamespace(update=lambda *args, **kwargs: None)

        def define_metric(self, name, **kwargs):
            calls.append(("define", name, kwargs))

        def log(self, metrics, step):
            calls.append(("log", step, dict(metrics)))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: FakeRun()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tracker,) = make_trackers(["wandb"], "r", tmp_path, {}, is_main=True)
    tracker.write(30, {"VLA Train/Loss": 1.0})
    tracker.write(10, {"Sim/reach-v3 Success": 0.5, "Sim/Step": 10})
    tracker.write(40, {"VLA Train/Loss": 0.5})
    assert ("define", "Sim/*", {"step_metric": "Sim/Step"}) in calls
    logs = [(step, metrics) for kind, step, metrics in calls if kind == "log"]
    assert logs == [(30, {"VLA Train/Loss": 1.0}), (30, {"Sim/reach-v3 Success": 0.5, "Sim/Step": 10}),
                    (40, {"VLA Train/Loss": 0.5})]
