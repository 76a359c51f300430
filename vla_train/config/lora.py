"""LoRAConfig: low-rank adapters instead of full fine-tuning (`--vla.lora.*`), as OpenVLA-OFT trains (r=32, alpha=16,
all linear layers of the ViT, projector and LLM, dropout 0, gaussian init), or as openpi's π0 LoRA variants (adapters
on the Gemma layers only, r=16 for PaliGemma's Gemma and r=32 for the action expert, alpha = r, the SigLIP tower and
projector trained in full). Options only: no torch import here."""

import re
from dataclasses import dataclass, field

LORA_INITS = ("gaussian", "kaiming")
BASE_MODULE_KEYS = ("vision_backbone", "projector", "llm_backbone")  # `models/vlm.py` ALL_MODULE_KEYS


@dataclass
class LoRAConfig:
    """Off by default. With `enabled`, every base weight is frozen (bf16 under mixed precision) and only the adapters
    (fp32) and the policy's own modules (heads, projectors, FiLM) train, whatever the freezing flags."""

    enabled: bool = False
    rank: int = 32  # r
    alpha: int = 16  # the update is scaled by alpha / r (OFT: min(r, 16))
    dropout: float = 0.0
    targets: str = "all-linear"  # "all-linear" or comma-separated module-name suffixes (e.g. "q_proj,v_proj")
    init: str = "gaussian"  # lora_A init: "gaussian" (std 1/r, OFT's) or "kaiming" (peft's default); lora_B = 0
    # the base modules whose linear layers get adapters (π0: only the LLM, which holds both experts' layers)
    modules: list[str] = field(default_factory=lambda: list(BASE_MODULE_KEYS))
    full_modules: list[str] = field(default_factory=list)  # base modules trained in full beside the adapters
    # peft's rank_pattern: module-name regex -> rank (matched against the end of the name, e.g. "expert\\..*" for
    # π0's action expert); each alpha scales with its rank, so every adapter keeps the update scale alpha / rank
    rank_pattern: dict[str, int] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def alpha_pattern(self) -> dict[str, float]:
        """peft's alpha_pattern for `rank_pattern`: alpha / rank kept, so one scaling merges every adapter."""
        return {pattern: rank * self.scaling for pattern, rank in self.rank_pattern.items()}

    def target_suffixes(self) -> list[str] | None:
        """None for all linear layers, else the module-name suffixes to adapt."""
        if self.targets == "all-linear":
            return None
        return [name.strip() for name in self.targets.split(",") if name.strip()]

    def validate(self) -> None:
        """Raise a ValueError naming the bad option and the fix."""
        if not self.enabled:
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--vla.lora.rank = {self.rank!r} must be an integer >= 1 (OFT: 32).")
        if not self.alpha > 0:
            raise ValueError(f"--vla.lora.alpha = {self.alpha!r} must be positive (OFT: 16).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--vla.lora.dropout = {self.dropout!r} must lie in [0, 1).")
        if self.init not in LORA_INITS:
            raise ValueError(f"--vla.lora.init {self.init!r}: choose one of {list(LORA_INITS)}.")
        if self.target_suffixes() == []:
            raise ValueError("--vla.lora.targets is empty: pass all-linear or module-name suffixes, e.g. q_proj,v_proj.")
        self._validate_modules()

    def _validate_modules(self) -> None:
        for option in ("modules", "full_modules"):
            unknown = [key for key in getattr(self, option) if key not in BASE_MODULE_KEYS]
            if unknown:
                raise ValueError(f"--vla.lora.{option} has {unknown}; choose among {list(BASE_MODULE_KEYS)}.")
        if not self.modules:
            raise ValueError(f"--vla.lora.modules is empty: name the modules to adapt, of {list(BASE_MODULE_KEYS)}.")
        both = sorted(set(self.modules) & set(self.full_modules))
        if both:
            raise ValueError(f"--vla.lora: {both} are in both modules (adapted) and full_modules (trained in full).")
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"--vla.lora.rank_pattern[{pattern!r}] = {rank!r} must be an integer >= 1.")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"--vla.lora.rank_pattern key {pattern!r} is not a regular expression ({error}).") \
                    from error
