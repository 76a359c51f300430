"""OpenVLA-OFT's modules: action heads (L1 regression, DDIM diffusion), projectors (proprio, noisy actions) and
FiLM for the ViT blocks, with OFT's parameter names (its checkpoints load by name)."""
