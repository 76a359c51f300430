"""π0's instruction tokens (openpi `PaligemmaTokenizer.tokenize`, π0 branch): the task with underscores and newlines
turned into spaces, tokenized with BOS, then "\n"; truncated to `max_token_len` (48). No chat template, no action
tokens: the instruction is the whole language prefix."""

from transformers import PreTrainedTokenizerBase


def pi0_prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str, max_token_len: int = 48) -> list[int]:
    """`[BOS] + tokens(cleaned instruction) + tokens("\\n")`, at most `max_token_len` ids."""
    cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
    ids = list(tokenizer(cleaned, add_special_tokens=True).input_ids)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return (ids + list(tokenizer("\n", add_special_tokens=False).input_ids))[:max_token_len]
