"""Tokenizers the project builds itself, for tiny models in tests and the demo (nothing is downloaded).

A character-level BPE (no merges) over a fixed 512-symbol base vocabulary, with the SentencePiece-style `▁` space
marker. Two styles mirror the real families' special-token conventions:
- `llama`: `<unk>`=0, `<s>`=1 (prepended to every encoding), `</s>`=2, all inside the base vocabulary;
- `qwen`: no BOS; `<|endoftext|>` (pad and eos), `<|im_start|>`, `<|im_end|>` added after the base vocabulary;
- `gemma` (PaliGemma's ids): `<pad>`=0, `<eos>`=1, `<bos>`=2 (prepended to every encoding), `<unk>`=3.
The last 256 base symbols are rare code points, so the action tokens decode to one character each and re-tokenize to
exactly the same ids (as the reference assumes of Llama-2).
"""

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

TINY_BASE_VOCAB_SIZE = 512
TOKENIZER_STYLES = ("llama", "qwen", "gemma")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
_SPACE = "▁"


def _base_vocabulary(specials: tuple[str, ...] = ("<unk>", "<s>", "</s>")) -> dict[str, int]:
    symbols = [*specials, _SPACE, "\n", *[c for c in string.printable if not c.isspace()]]
    code_point = 0x100  # Latin Extended and IPA letters: single printable code points no text here uses
    while len(symbols) < TINY_BASE_VOCAB_SIZE:
        symbols.append(chr(code_point))
        code_point += 1
    return {symbol: index for index, symbol in enumerate(symbols)}


def build_tiny_tokenizer(style: str = "llama", model_max_length: int = 2048) -> PreTrainedTokenizerBase:
    """A deterministic tiny tokenizer of the given style (see module docstring)."""
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"Unknown tiny tokenizer style {style!r}; choose one of {list(TOKENIZER_STYLES)}.")
    vocabulary = _base_vocabulary(_GEMMA_SPECIALS) if style == "gemma" else _base_vocabulary()
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never")
    if style == "llama":
        tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif style == "gemma":
        tokenizer.add_special_tokens(list(_GEMMA_SPECIALS))
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                                 special_tokens=[("<bos>", 2)])
        special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    else:
        tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, padding_side="right", **special
    )
