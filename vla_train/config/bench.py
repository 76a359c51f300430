"""Config of `vla-scripts/bench_data.py`."""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchDataConfig:
    data_root_dir: Path = Path("runs/bench_data")  # written on first use with the benchmark workload
    data_mix: str = "bench_fractal_jaco"  # any registered mixture works with --data_root_dir pointing at its data
    shuffle_buffer_size: int = 10_000  # frames per rank
    image_aug: bool = False
    resolution: int = 224  # output image side (pixels)
    seconds: float = 60.0  # measured streaming time after the first frame
    deterministic: bool = False
    torch_path: bool = True  # also time prompt/tokenizer/image transform and collator
    model_id: str = "prism-dinosiglip-224px+7b"  # whose image transform and prompt format the torch path uses
    batch_size: int = 32
