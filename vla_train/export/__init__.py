"""The run directory <-> Hugging Face: `export_hf` (a training checkpoint -> an OpenVLA-format directory that loads
with transformers alone and `trust_remote_code=True`) and `import_hf` (such a directory, or the released
`openvla-7b`, -> a training run directory that `train.py --pretrained_checkpoint ... --is_resume false` fine-tunes)."""

from vla_train.export.hf import export_hf
from vla_train.export.hf_import import import_hf

__all__ = ["export_hf", "import_hf"]
