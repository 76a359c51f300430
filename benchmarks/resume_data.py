"""Time to resume a rank's data stream exactly, at two positions 10x apart (issue 10: the cost must be bounded by the
shuffle buffer, not the position).

For each position it streams a fresh pipeline to the position (the cost of the old `skip(n)` resume, which replayed
every consumed frame), takes `ResumableShuffle.state_at(position)`, then builds a resumed pipeline and times it to
its first frame; it checks that the next frames equal the straight stream's. Prints one line per position.

    python benchmarks/resume_data.py --positions 10000 100000 --buffer 2000
"""

import argparse
import time
from pathlib import Path

from vla_train.data import interleave
from vla_train.data.demo import write_demo_datasets


def _key(frame: dict) -> tuple:
    return frame["dataset_name"], frame["action"].tobytes(), frame["observation"]["image_primary"].tobytes()


def measure(cfg: interleave.PipelineConfig, plan: interleave.MixturePlan, position: int, check: int) -> dict:
    started = time.perf_counter()
    frames, shuffle = interleave.build_resumable_frames(cfg, plan)
    stream = frames.as_numpy_iterator()
    for _ in range(position):
        next(stream)
    replay_s = time.perf_counter() - started
    state = shuffle.state_at(position)
    straight = [_key(next(stream)) for _ in range(check)]
    started = time.perf_counter()
    resumed_frames, _ = interleave.build_resumable_frames(cfg, plan, resume=state)
    resumed = resumed_frames.as_numpy_iterator()
    first = _key(next(resumed))
    resume_s = time.perf_counter() - started
    exact = [first, *(_key(next(resumed)) for _ in range(check - 1))] == straight
    reread = state["snapshot"]["received"] - state["anchor_arrival"] + position - state["snapshot"]["emitted"]
    state_mb = (sum(map(len, (state["anchor_files"] or {}).values())) + state["snapshot"]["arrivals"].nbytes) / 2**20
    return {"position": position, "replay_all_s": replay_s, "resume_s": resume_s, "frames_reread": reread,
            "state_mb": state_mb, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", type=Path, default=Path("runs/demo_data"))
    parser.add_argument("--data_mix", default="demo")
    parser.add_argument("--buffer", type=int, default=2000, help="shuffle buffer (frames per rank)")
    parser.add_argument("--positions", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--check", type=int, default=100, help="frames compared after the resume")
    args = parser.parse_args()
    if not args.data_root.is_dir():
        write_demo_datasets(args.data_root)
    cfg = interleave.PipelineConfig(data_root_dir=args.data_root, data_mix=args.data_mix,
                                    shuffle_buffer_size=args.buffer)
    plan = interleave.plan_mixture(cfg)
    print(f"buffer {args.buffer} frames, mixture {args.data_mix}, deterministic stream")
    for position in args.positions:
        r = measure(cfg, plan, position, args.check)
        print(f"position {r['position']:>9,d}: resume {r['resume_s']:6.2f} s to the first frame "
              f"({r['frames_reread']:,d} frames re-read, state {r['state_mb']:.2f} MB); replaying every consumed "
              f"frame (the old resume) {r['replay_all_s']:7.1f} s; next {args.check} frames exact: {r['exact']}")


if __name__ == "__main__":
    main()
