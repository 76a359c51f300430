"""PrismaticVLM: vision backbone -> projector -> patch embeddings spliced into the LLM input after BOS.

Training forward (facts §4.2): `input_ids [B, T]`, `attention_mask [B, T]`, `pixel_values` (`[B, 3, S, S]` or a dict of
them), `labels [B, T]`. The LLM sees `[emb(BOS), projected patches [P], emb(rest)]`, i.e. `T + P` positions, with the
mask extended by ones and the labels by -100 over the patches; the loss is the LLM's mean next-token cross-entropy.
In train mode with labels, the output is a `SupervisedCausalLMOutput`: the LM head runs only at the supervised
positions (logits `[N, V]`, with their target `labels [N]` and batch `rows [N]` in input order); in eval mode or
without labels, the full logits `[B, T + P, V]`.
"""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vla_train.models.llm import IGNORE_INDEX, LLMBackbone, SupervisedCausalLMOutput
from vla_train.models.projector import build_projector
from vla_train.models.vision import VisionBackbone

ALL_MODULE_KEYS = ("vision_backbone", "llm_backbone", "projector")


class PrismaticVLM(nn.Module):
    """A Prismatic VLM; `trainable_module_keys` and `vision_backbone_requires_grad` are set by `freeze_backbones`."""

    # Whether FSDP2's root unit casts the floating-point forward inputs to bf16 under mixed precision (every inner
    # unit casts its own inputs either way). A family whose root-level math needs its FP32 inputs (π0's flow-matching
    # target and time embedding) sets False and casts for its root-level modules itself.
    root_casts_forward_inputs: bool = True

    def __init__(self, model_id: str, vision_backbone: VisionBackbone, llm_backbone: LLMBackbone,
                 arch_specifier: str = "gelu-mlp", enable_mixed_precision_training: bool = True) -> None:
        super().__init__()
        self.model_family, self.model_id, self.arch_specifier = "prismatic", model_id, arch_specifier
        self.enable_mixed_precision_training = enable_mixed_precision_training
        self.vision_backbone, self.llm_backbone = vision_backbone, llm_backbone
        # Same initialization as the reference (seed = vision embed dim, identical on every rank), without
        # clobbering the caller's global RNG state as the reference does.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(vision_backbone.embed_dim)
            self.projector = build_projector(arch_specifier, vision_backbone.embed_dim, llm_backbone.embed_dim)
        self.all_module_keys = list(ALL_MODULE_KEYS)
        self.trainable_module_keys = list(ALL_MODULE_KEYS)
        self.vision_backbone_requires_grad = True
        self.lora = None  # the LoRAConfig once `models/lora.py` `apply_lora` adapted the model

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.num_patches

    # --- what a policy family's model (a subclass) declares beyond the base VLM; none here -----------------------
    def added_state(self) -> dict[str, torch.Tensor]:
        """Initial values (full state-dict keys, CPU, FP32) of the modules a base VLM checkpoint lacks: LoRA
        adapters here; a policy family adds its own."""
        if self.lora is None:
            return {}
        from vla_train.models.lora import lora_initial_state  # lazy: lora.py imports this module

        return lora_initial_state(self, self.lora)

    def base_checkpoint_key(self, key: str) -> str:
        """The key under which a base VLM checkpoint holds this model's state-dict `key` (an adapted Linear's
        weight is `<name>.base_layer.weight` here, `<name>.weight` there)."""
        if self.lora is None:
            return key
        from vla_train.models.lora import lora_base_key

        return lora_base_key(key)

    def always_trainable(self) -> list[nn.Parameter]:
        """Parameters that train whatever the freezing stage (a policy's heads)."""
        return []

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the training forward never reaches beyond the vision backbone's own (a policy that reads hidden
        states has no use for the LM head): frozen in every stage, so no optimizer state waits for a gradient."""
        return []

    def policy_fsdp_units(self) -> list[nn.Module]:
        """A policy's own FSDP units beyond the backbones' (run after the LLM, in forward order); none here."""
        return []

    def policy_checkpoint_containers(self) -> list[nn.Module]:
        """Containers of a policy's own activation-checkpointing units (wrapped in place); none here."""
        return []

    def fsdp_unit_classes(self) -> tuple[type[nn.Module], ...]:
        """Module classes that form FSDP / activation-checkpointing units (composed from the backbones)."""
        return (*self.vision_backbone.fsdp_unit_classes, self.llm_backbone.transformer_layer_cls,
                type(self.projector))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | dict[str, torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        multimodal_indices: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **llm_kwargs,
    ) -> CausalLMOutputWithPast:
        """Fused forward; `multimodal_indices` (default: all rows) selects the rows that have images."""
        if input_ids.shape[1] == 1 and past_key_values is not None:  # cached decoding: text only
            return self.llm_backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                     past_key_values=past_key_values, use_cache=use_cache, **llm_kwargs)
        if multimodal_indices is not None and multimodal_indices.numel() == 0:  # a text-only batch
            return self.llm_backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                     past_key_values=past_key_values, use_cache=use_cache, **llm_kwargs)
        if pixel_values is None:
            raise ValueError("PrismaticVLM.forward needs pixel_values (or empty multimodal_indices for text only).")
        if input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must hold BOS plus text, got shape {tuple(input_ids.shape)}.")
        batch = input_ids.shape[0]
        if multimodal_indices is None:
            multimodal_indices = torch.arange(batch, dtype=torch.long, device=input_ids.device)

        def rows(x):  # select multimodal rows of a tensor or a dict of tensors
            return {k: v[multimodal_indices] for k, v in x.items()} if isinstance(x, dict) else x[multimodal_indices]

        with torch.set_grad_enabled(self.vision_backbone_requires_grad and torch.is_grad_enabled()):
            patch_features = self.vision_backbone(rows(pixel_values))
        projected = self.projector(patch_features)  # [M, P, d]
        embeddings = self.llm_backbone.embed_input_ids(input_ids)  # [B, T, d]
        projected = projected.to(embeddings.dtype)
        fused_embeddings, fused_mask, fused_labels = self._splice(
            embeddings, attention_mask, labels, projected, multimodal_indices
        )
        output = self.llm_backbone(input_ids=None, inputs_embeds=fused_embeddings, attention_mask=fused_mask,
                                   labels=fused_labels, past_key_values=past_key_values, use_cache=use_cache,
                                   **llm_kwargs)
        if isinstance(output, SupervisedCausalLMOutput) and multimodal_indices.numel() != batch:
            output.rows = self._input_order(multimodal_indices, batch)[output.rows]  # fused row -> input row
        return output

    @staticmethod
    def _input_order(multimodal_indices: torch.LongTensor, batch: int) -> torch.LongTensor:
        """`[B]`: the input row of each fused row (multimodal rows first, then the text-only rows, as `_splice`)."""
        is_text = torch.ones(batch, dtype=torch.bool, device=multimodal_indices.device)
        is_text[multimodal_indices] = False
        return torch.cat([multimodal_indices, is_text.nonzero().flatten()])

    @staticmethod
    def _splice(embeddings: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                projected: torch.Tensor, multimodal_indices: torch.LongTensor):
        """Insert patches after BOS for multimodal rows; text-only rows get P padded positions at the end."""
        batch, num_patches = embeddings.shape[0], projected.shape[1]
        mm = embeddings[multimodal_indices]
        fused_embeddings = torch.cat([mm[:, :1], projected, mm[:, 1:]], dim=1)
        fused_mask = fused_labels = None
        if attention_mask is not None:
            mask = attention_mask[multimodal_indices]
            ones = torch.ones(mask.shape[0], num_patches, dtype=mask.dtype, device=mask.device)
            fused_mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
        if labels is not None:
            lab = labels[multimodal_indices]
            ignore = torch.full((lab.shape[0], num_patches), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)
            fused_labels = torch.cat([lab[:, :1], ignore, lab[:, 1:]], dim=1)
        if multimodal_indices.numel() == batch:
            return fused_embeddings, fused_mask, fused_labels
        is_text = torch.ones(batch, dtype=torch.bool, device=embeddings.device)
        is_text[multimodal_indices] = False
        text = embeddings[is_text]
        pad = torch.zeros(text.shape[0], num_patches, text.shape[2], dtype=text.dtype, device=text.device)
        fused_embeddings = torch.cat([fused_embeddings, torch.cat([text, pad], dim=1)], dim=0)
        if fused_mask is not None:
            text_mask = attention_mask[is_text]
            zeros = torch.zeros(text_mask.shape[0], num_patches, dtype=text_mask.dtype, device=text_mask.device)
            fused_mask = torch.cat([fused_mask, torch.cat([text_mask, zeros], dim=1)], dim=0)
        if fused_labels is not None:
            text_labels = labels[is_text]
            ignore = torch.full((text_labels.shape[0], num_patches), IGNORE_INDEX, dtype=text_labels.dtype,
                                device=text_labels.device)
            fused_labels = torch.cat([fused_labels, torch.cat([text_labels, ignore], dim=1)], dim=0)
        return fused_embeddings, fused_mask, fused_labels
