"""The project's one logger. Rank 0 logs at INFO, other ranks at WARNING, so multi-process runs stay readable."""

import logging
import os

LOGGER_NAME = "vla_train"
logger = logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Attach one stream handler to the project logger; call once per process (idempotent).

    `rank` defaults to the torchrun `RANK` environment variable (0 without torchrun).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return logger
