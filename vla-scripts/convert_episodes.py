"""Convert a folder of episode files (.npz / .h5 / .hdf5) into an RLDS dataset plus its registry YAML entry.

File layout: see `vla_train/data/convert.py`. Prints the YAML entry (also written to
`<out_root>/<name>/vla_train_dataset.yaml`) on stdout; logs go to stderr.

Usage: python vla-scripts/convert_episodes.py --input_dir my_episodes --name my_robot_data [--out_root runs/data]
       [--image_keys '[image, wrist_image]'] [--val_fraction 0.1] [--default_instruction "pick up the cup"]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

from dataclasses import dataclass
from pathlib import Path

import draccus

from vla_train.data.convert import convert_episodes
from vla_train.log import setup_logging


@dataclass
class ConvertEpisodesConfig:
    input_dir: Path = Path("episodes")  # folder of episode files, searched recursively
    name: str = "my_dataset"  # dataset name (lower_snake_case); written to <out_root>/<name>/1.0.0/
    out_root: Path = Path("runs/data")  # the data root to train with
    image_keys: list[str] | None = None  # uint8 [T, H, W, 3] arrays; default: all of them in the first file
    action_key: str = "actions"  # float [T, A]
    state_key: str = "state"  # optional float [T, S]
    instruction_key: str = "instruction"  # a string or [T] strings
    default_instruction: str | None = None  # for files without an instruction
    val_fraction: float = 0.0  # episodes held out as the `val` split (chosen with `seed`)
    seed: int = 0
    state_encoding: str = "NONE"  # registry state encoding of `state` (NONE, POS_EULER, POS_QUAT, JOINT, ...)
    action_encoding: str | None = None  # EEF_POS / EEF_R6; default: EEF_R6 for 10-D actions, else EEF_POS
    overwrite: bool = False  # replace an existing dataset of that name


@draccus.wrap()
def main(cfg: ConvertEpisodesConfig) -> None:
    setup_logging()
    result = convert_episodes(cfg.input_dir, cfg.out_root, cfg.name, image_keys=cfg.image_keys,
                              action_key=cfg.action_key, state_key=cfg.state_key,
                              instruction_key=cfg.instruction_key, default_instruction=cfg.default_instruction,
                              val_fraction=cfg.val_fraction, seed=cfg.seed, state_encoding=cfg.state_encoding,
                              action_encoding=cfg.action_encoding, overwrite=cfg.overwrite)
    print(result.yaml_text, end="")  # on purpose: the registry entry, ready to paste


if __name__ == "__main__":
    main()
