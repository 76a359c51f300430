"""The VLA prompt as token ids, shared by training (batch transform) and inference (`predict_action`).

Ids are assembled from parts rather than by re-tokenizing a string that embeds the decoded action characters (the
reference's way, which silently breaks when the action characters merge with their neighbours):
`input_ids = tokenize(prompt before the reply) + action ids + tokenize(stop text)`; labels supervise exactly the action
ids and the stop ids. For Llama-2 this reproduces the reference's ids (`..., ":", 29871, a_1..a_A, 2`), and the
inference prefix is exactly the training prefix, so no token needs patching in at inference.
"""

import functools
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from vla_train.models.llm import IGNORE_INDEX
from vla_train.models.prompts import VLA_QUESTION_TEMPLATE, PromptBuilder


def vla_prompt_prefix_ids(
    prompt_builder_fn: type[PromptBuilder], tokenizer: PreTrainedTokenizerBase, instruction: str
) -> list[int]:
    """Ids of the prompt up to (and including) the space before the actions; BOS added when the tokenizer does."""
    if not instruction or not instruction.strip():
        raise ValueError("Empty language instruction: the prompt would read 'What action should the robot take to ?'. "
                         "Filter such frames (skip_unlabeled) before building prompts.")
    builder = prompt_builder_fn("openvla")
    builder.add_turn("human", VLA_QUESTION_TEMPLATE.format(instruction=instruction.lower()))
    return list(tokenizer(builder.generation_prompt(), add_special_tokens=True).input_ids)


def vla_training_ids(
    prompt_builder_fn: type[PromptBuilder],
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    action_token_ids: Sequence[int],
    predict_stop_token: bool = True,
    append_stop: bool = True,
) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` for one frame: labels are -100 except on the action ids (and the stop ids). The prompt's
    ids are cached per instruction (the frames of an episode share one; tokenizing it is a third of the transform).
    `append_stop=False`: no stop ids after the actions (VLA-Adapter's ActionQuery layout)."""
    prefix, stop = _prompt_and_stop_ids(prompt_builder_fn, tokenizer, instruction)
    prefix, stop = list(prefix), list(stop) if append_stop else []
    actions = [int(i) for i in action_token_ids]
    labels = [IGNORE_INDEX] * len(prefix) + actions + (stop if predict_stop_token else [IGNORE_INDEX] * len(stop))
    return prefix + actions + stop, labels


@functools.lru_cache(maxsize=8192)
def _prompt_and_stop_ids(prompt_builder_fn: type[PromptBuilder], tokenizer: PreTrainedTokenizerBase,
                         instruction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The prompt prefix ids and the stop ids (tuples: the cache's values are shared). Keyed by the tokenizer object,
    which training sets up once before its first frame."""
    prefix = vla_prompt_prefix_ids(prompt_builder_fn, tokenizer, instruction)
    stop = tokenizer(prompt_builder_fn.stop_text.rstrip(), add_special_tokens=False).input_ids
    return tuple(prefix), tuple(stop)
