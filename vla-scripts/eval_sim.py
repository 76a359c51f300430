"""Closed-loop evaluation of a trained run's policy in MetaWorld: success rates (95 % Wilson intervals), episode
lengths, videos; writes `<run_dir>/eval/<step>/results.json` and prints a table (`vla_train/sim/run_eval.py`).

The policy (OpenVLA-OFT: whole chunks, executed open-loop for `--open_loop_steps`, default its chunk length;
openvla: one action, so re-planned every step) runs in this process on `--device`; the environments run in
`--workers` spawned processes (`vla_train/sim/evaluate.py`). Episode `i` of every task starts from seed
`10000 + seed * 100000 + i`, never a demonstration seed. The task's dataset `metaworld_<task, - -> _>` is the
`unnorm_key`; it must be in the run's `dataset_statistics.json`.

Usage: python vla-scripts/eval_sim.py --run_dir runs/<run> [--step 5000] [--tasks '[reach-v3,push-v3]'|'[MT10]']
       [--episodes 50] [--seed 0] [--workers 4] [--open_loop_steps 8] [--max_steps 500] [--device cuda]
       [--videos_per_task 2] [--image_size <the run's>]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

from vla_train.sim.run_eval import main

if __name__ == "__main__":
    main()
