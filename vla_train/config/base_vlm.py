"""Config of `vla-scripts/make_base_vlm.py`: write a base-VLM run directory from a registered ModelConfig."""

from dataclasses import dataclass, field
from pathlib import Path

from vla_train.config.model import ModelConfig, TinyDinoSigLIPLlama


@dataclass
class MakeBaseVLMConfig:
    model: ModelConfig = field(default_factory=TinyDinoSigLIPLlama)  # --model.type <model_id>
    run_dir: Path | None = None  # output directory; default runs/base-vlms/<model_id>
    llm_hf_dir: Path | None = None  # local Hugging Face directory with the LLM's weights and tokenizer
    init_seed: int = 7  # seed of the random initialization (identical on every rank)
    overwrite: bool = False  # replace an existing run directory's checkpoint
