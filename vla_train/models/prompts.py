"""Prompt builders: turn (human, gpt) turns into the exact strings each LLM family was trained on.

The strings match the Prismatic/OpenVLA reference byte for byte (facts §4.6). Each builder also knows:
- `generation_prompt()`: the prompt *before* the gpt message, without the reference's trailing `rstrip()`, which is the
  exact context the model sees right before the action tokens at training time (the reference re-appends the lone
  space token 29871 at inference to recover it; tokenizing this text gives the same ids generically);
- `stop_text`: what follows a gpt message and is supervised after the actions (the stop token(s)).
"""

from typing import ClassVar

VLA_QUESTION_TEMPLATE = "What action should the robot take to {instruction}?"


class PromptBuilder:
    """Accumulate alternating human/gpt turns (human first) into one prompt string."""

    bos: ClassVar[str] = "<s>"
    eos: ClassVar[str] = "</s>"
    stop_text: ClassVar[str] = "</s>"
    # Whether a leading BOS text is removed from the prompt (the tokenizer adds BOS itself).
    strip_bos_text: ClassVar[bool] = True

    def __init__(self, model_family: str = "openvla", system_prompt: str | None = None) -> None:
        self.model_family = model_family
        self.system_prompt = system_prompt
        self.prompt, self.turn_count = "", 0

    # --- per-family formats -------------------------------------------------------------------------------------
    def wrap_human(self, message: str, first: bool) -> str:
        raise NotImplementedError

    def wrap_gpt(self, message: str) -> str:
        return f"{message if message != '' else ' '}{self.stop_text}"

    # --- shared mechanics ---------------------------------------------------------------------------------------
    def add_turn(self, role: str, message: str) -> str:
        """Append one turn; roles must alternate human, gpt, human, ... Returns the wrapped text."""
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"Prompt turns must alternate human/gpt starting with human; got role={role!r}, "
                             f"expected {expected!r} at turn {self.turn_count}.")
        message = message.replace("<image>", "").strip()
        wrapped = self.wrap_human(message, first=self.turn_count == 0) if role == "human" else self.wrap_gpt(message)
        self.prompt += wrapped
        self.turn_count += 1
        return wrapped

    def _without_bos(self, prompt: str) -> str:
        return prompt.removeprefix(self.bos) if self.strip_bos_text else prompt

    def get_potential_prompt(self, message: str) -> str:
        """The prompt as it would read after one more human turn (the builder is not modified)."""
        message = message.replace("<image>", "").strip()
        return self._without_bos(self.prompt + self.wrap_human(message, first=self.turn_count == 0)).rstrip()

    def get_prompt(self) -> str:
        """Reference behaviour: the accumulated prompt, leading BOS text removed, right-stripped."""
        return self._without_bos(self.prompt).rstrip()

    def generation_prompt(self) -> str:
        """The accumulated prompt without the final right-strip: the context that precedes a gpt message."""
        return self._without_bos(self.prompt)


class PurePromptBuilder(PromptBuilder):
    """Base (non-chat) LMs: `In: {msg}\\nOut: {reply}</s>` (Llama-2 pure, Mistral pure; OpenVLA 7B)."""

    def wrap_human(self, message: str, first: bool) -> str:
        return f"In: {message}\nOut: "


class VicunaV15ChatPromptBuilder(PromptBuilder):
    """Vicuna v1.5: system prompt, then `USER: {msg} ASSISTANT: {reply}</s>` (OpenVLA v0.1)."""

    DEFAULT_SYSTEM_PROMPT = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )

    def __init__(self, model_family: str = "openvla", system_prompt: str | None = None) -> None:
        super().__init__(model_family, system_prompt)
        self.system_prompt = (self.DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt).strip() + " "

    def wrap_human(self, message: str, first: bool) -> str:
        return f"{self.system_prompt if first else ''}USER: {message} ASSISTANT: "


class LLaMa2ChatPromptBuilder(PromptBuilder):
    """Llama-2 chat: `[INST] <<SYS>...<</SYS>>\\n\\n{msg} [/INST] {reply}</s>` (the reference's `<<SYS>` typo kept)."""

    DEFAULT_SYSTEM_PROMPT = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
        "provides, and assist the user with a variety of tasks using natural language."
    )

    def __init__(self, model_family: str = "openvla", system_prompt: str | None = None) -> None:
        super().__init__(model_family, system_prompt)
        self.system_prompt = (self.DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt).strip()

    def wrap_human(self, message: str, first: bool) -> str:
        if first:
            message = f"<<SYS>\n{self.system_prompt}\n<</SYS>>\n\n{message}"
        return f"[INST] {message} [/INST] "


class MistralInstructPromptBuilder(PromptBuilder):
    """Mistral instruct: `[INST] {msg} [/INST] {reply}</s>`, no system prompt."""

    def wrap_human(self, message: str, first: bool) -> str:
        return f"[INST] {message} [/INST] "


class PhiPromptBuilder(PromptBuilder):
    """Phi-2: `<|endoftext|>Input: {msg}\\nOutput: {reply}\\n<|endoftext|>`; BOS kept (its tokenizer adds none)."""

    bos: ClassVar[str] = "<|endoftext|>"
    eos: ClassVar[str] = "<|endoftext|>"
    stop_text: ClassVar[str] = "\n<|endoftext|>"
    strip_bos_text: ClassVar[bool] = False

    def wrap_human(self, message: str, first: bool) -> str:
        return f"{self.bos if first else ''}Input: {message}\nOutput: "


class Qwen25ChatPromptBuilder(PromptBuilder):
    """Qwen2.5 ChatML as used by MiniVLA: system turn, `<|im_start|>user ...<|im_end|>`, assistant reply."""

    bos: ClassVar[str] = "<|im_start|>"
    eos: ClassVar[str] = "<|endoftext|>"
    stop_text: ClassVar[str] = "<|im_end|>\n"
    strip_bos_text: ClassVar[bool] = False
    DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def __init__(self, model_family: str = "openvla", system_prompt: str | None = None) -> None:
        super().__init__(model_family, system_prompt)
        self.system_prompt = (self.DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt).strip()

    def wrap_human(self, message: str, first: bool) -> str:
        system = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if first else ""
        return f"{system}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


PROMPT_BUILDERS: dict[str, type[PromptBuilder]] = {
    "pure": PurePromptBuilder,
    "vicuna-v15": VicunaV15ChatPromptBuilder,
    "llama2-chat": LLaMa2ChatPromptBuilder,
    "mistral-instruct": MistralInstructPromptBuilder,
    "phi": PhiPromptBuilder,
    "qwen25-chat": Qwen25ChatPromptBuilder,
}


def get_prompt_builder_class(name: str) -> type[PromptBuilder]:
    """Look up a prompt builder by registry name."""
    if name not in PROMPT_BUILDERS:
        raise ValueError(f"Unknown prompt builder {name!r}; choose one of {sorted(PROMPT_BUILDERS)}.")
    return PROMPT_BUILDERS[name]
