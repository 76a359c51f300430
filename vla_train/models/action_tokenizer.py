"""Discretize continuous actions into 256 bins mapped onto the last ids of an LLM vocabulary (OpenVLA numerics).

Bins are the 256 edges `linspace(min_action, max_action, 256)`; an action value `x` (clipped to the range) is
digitized to `d = digitize(x, edges)` in 1..256 and becomes token id `vocab_end - d`. Decoding maps an id back to the
centre of bin `clip(vocab_end - id - 1, 0, 254)`, so both extreme ids decode exactly as in the reference.
`vocab_end` is the base vocabulary size (`tokenizer.vocab_size`, 32000 for Llama-2: ids 31744..31999), or the end of
a block of added tokens reserved for actions.
"""

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


class ActionTokenizer:
    """Map actions in [min_action, max_action] to token ids and back; shapes are preserved (`[..., action_dim]`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        bins: int = 256,
        min_action: float = -1.0,
        max_action: float = 1.0,
        vocab_end: int | None = None,
    ) -> None:
        if bins < 2:
            raise ValueError(f"ActionTokenizer needs at least 2 bins, got bins={bins}.")
        if not min_action < max_action:
            raise ValueError(f"ActionTokenizer needs min_action < max_action, got {min_action} >= {max_action}.")
        self.tokenizer = tokenizer
        self.n_bins, self.min_action, self.max_action = bins, float(min_action), float(max_action)
        self.vocab_end = int(tokenizer.vocab_size if vocab_end is None else vocab_end)
        if self.vocab_end - bins < 0:
            raise ValueError(f"Vocabulary end {self.vocab_end} is smaller than the {bins} action bins.")
        self.bins = np.linspace(self.min_action, self.max_action, self.n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        # Every id strictly greater than this is an action token (31743 for Llama-2).
        self.action_token_begin_idx = self.vocab_end - (self.n_bins + 1)

    @property
    def vocab_size(self) -> int:
        """Number of action tokens (= bins)."""
        return self.n_bins

    @property
    def action_token_ids(self) -> range:
        """The ids actions can encode to: `vocab_end - bins .. vocab_end - 1`."""
        return range(self.vocab_end - self.n_bins, self.vocab_end)

    def encode_to_ids(self, action: np.ndarray | Sequence[float]) -> np.ndarray:
        """Actions `[..., A]` (float) -> token ids `[..., A]` (int64)."""
        action = np.clip(np.asarray(action, dtype=np.float64), self.min_action, self.max_action)
        return (self.vocab_end - np.digitize(action, self.bins)).astype(np.int64)

    def __call__(self, action: np.ndarray | Sequence[float]) -> str | list[str]:
        """Reference API: actions -> decoded token string (a list of strings for a 2-D input)."""
        ids = self.encode_to_ids(action)
        if ids.ndim == 1:
            return self.tokenizer.decode(ids.tolist())
        return self.tokenizer.batch_decode(ids.tolist())

    def decode_token_ids_to_actions(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Token ids `[...]` -> bin-centre actions `[...]` (float64)."""
        discretized = self.vocab_end - np.asarray(token_ids, dtype=np.int64)
        return self.bin_centers[np.clip(discretized - 1, 0, self.bin_centers.shape[0] - 1)]

    def is_action_token(self, token_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of ids inside the action range."""
        token_ids = np.asarray(token_ids)
        return (token_ids > self.action_token_begin_idx) & (token_ids < self.vocab_end)
