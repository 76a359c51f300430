"""Prompt strings must match the reference byte for byte (facts §4.6)."""

import pytest

from vla_train.models.prompts import (
    PROMPT_BUILDERS,
    LLaMa2ChatPromptBuilder,
    MistralInstructPromptBuilder,
    PhiPromptBuilder,
    PurePromptBuilder,
    Qwen25ChatPromptBuilder,
    VicunaV15ChatPromptBuilder,
    get_prompt_builder_class,
)

QUESTION = "What action should the robot take to put the carrot in the bowl?"
ACTIONS = "ĀāĂăĄąĆ"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

EXPECTED_TRAINING_PROMPTS = {
    PurePromptBuilder: f"In: {QUESTION}\nOut: {ACTIONS}</s>",
    VicunaV15ChatPromptBuilder: f"{VICUNA_SYSTEM} USER: {QUESTION} ASSISTANT: {ACTIONS}</s>",
    LLaMa2ChatPromptBuilder: f"[INST] <<SYS>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{QUESTION} [/INST] {ACTIONS}</s>",
    MistralInstructPromptBuilder: f"[INST] {QUESTION} [/INST] {ACTIONS}</s>",
    PhiPromptBuilder: f"<|endoftext|>Input: {QUESTION}\nOutput: {ACTIONS}\n<|endoftext|>",
    Qwen25ChatPromptBuilder: (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ACTIONS}<|im_end|>"
    ),
}

EXPECTED_INFERENCE_PROMPTS = {
    PurePromptBuilder: f"In: {QUESTION}\nOut:",
    VicunaV15ChatPromptBuilder: f"{VICUNA_SYSTEM} USER: {QUESTION} ASSISTANT:",
    MistralInstructPromptBuilder: f"[INST] {QUESTION} [/INST]",
    PhiPromptBuilder: f"<|endoftext|>Input: {QUESTION}\nOutput:",
}


@pytest.mark.parametrize("builder_cls", list(EXPECTED_TRAINING_PROMPTS))
def test_training_prompt_is_byte_exact(builder_cls):
    builder = builder_cls("openvla")
    builder.add_turn("human", QUESTION)
    builder.add_turn("gpt", ACTIONS)
    assert builder.get_prompt() == EXPECTED_TRAINING_PROMPTS[builder_cls]


@pytest.mark.parametrize("builder_cls", list(EXPECTED_INFERENCE_PROMPTS))
def test_inference_prompt_is_right_stripped(builder_cls):
    builder = builder_cls("openvla")
    assert builder.get_potential_prompt(QUESTION) == EXPECTED_INFERENCE_PROMPTS[builder_cls]
    builder.add_turn("human", QUESTION)
    assert builder.get_prompt() == EXPECTED_INFERENCE_PROMPTS[builder_cls]
    # the generation prompt keeps the trailing space the reply follows at training time
    assert builder.generation_prompt() == EXPECTED_INFERENCE_PROMPTS[builder_cls] + " "


def test_vicuna_system_prompt_only_on_first_turn_and_image_tag_removed():
    builder = VicunaV15ChatPromptBuilder("prismatic")
    builder.add_turn("human", "<image>\nDescribe this.")
    builder.add_turn("gpt", "A bowl.")
    builder.add_turn("human", "And now?")
    builder.add_turn("gpt", "")
    assert builder.get_prompt() == (
        f"{VICUNA_SYSTEM} USER: Describe this. ASSISTANT: A bowl.</s>USER: And now? ASSISTANT:  </s>"
    )


def test_pure_multi_turn_and_empty_reply():
    builder = PurePromptBuilder("openvla")
    builder.add_turn("human", "a")
    builder.add_turn("gpt", "")
    builder.add_turn("human", "b")
    assert builder.get_prompt() == "In: a\nOut:  </s>In: b\nOut:"


@pytest.mark.parametrize("roles", [["gpt"], ["human", "human"]])
def test_turns_must_alternate(roles):
    builder = PurePromptBuilder("openvla")
    with pytest.raises(ValueError, match="alternate"):
        for role in roles:
            builder.add_turn(role, "hello")


def test_registry_lookup():
    assert set(PROMPT_BUILDERS) == {"pure", "vicuna-v15", "llama2-chat", "mistral-instruct", "phi", "qwen25-chat"}
    assert get_prompt_builder_class("pure") is PurePromptBuilder
    with pytest.raises(ValueError, match="Unknown prompt builder 'chatml'"):
        get_prompt_builder_class("chatml")
