"""Training engine: everything that knows about ranks (process group, FSDP, optimizer, checkpoints, metrics, loop)."""
