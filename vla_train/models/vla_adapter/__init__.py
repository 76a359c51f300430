"""VLA-Adapter: ActionQuery tokens and a Bridge-Attention policy over every LLM layer's features."""
