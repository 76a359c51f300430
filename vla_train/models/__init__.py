"""Model stack: vision backbones, projectors, LLM backbones, prompt builders, the Prismatic VLM and OpenVLA.

Modules here build `nn.Module`s and their registries. They read model files (Hugging Face directories, Prismatic run
directories) but never datasets, and hold no distributed code.
"""
