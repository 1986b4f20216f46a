"""Real models' chat templates (tests/fixtures/chat_templates) render in shoal's sandboxed jinja2 and give
each family's turn format, generation prompt included."""

from __future__ import annotations

from pathlib import Path

import pytest
from shoal.models.tokenizer import Tokenizer

from tests.models.family_gguf import byte_level_vocab

TEMPLATES = Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates"
CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
]
CHATML = ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
          "Hello.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
EXPECTED = {
    "Qwen-Qwen2.5-7B-Instruct": CHATML,
    "Qwen-Qwen3-0.6B": CHATML,
    "microsoft-Phi-3.5-mini-instruct": ("<|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n"
                                        "<|assistant|>\nHello.<|end|>\n<|user|>\nCapital of France?<|end|>\n"
                                        "<|assistant|>\n"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>[INST]Hi[/INST]Hello.</s>[INST]Be terse.\n\n"
                                             "Capital of France?[/INST]"),
}
GENERATION_PROMPT = {"Qwen-Qwen2.5-7B-Instruct": "<|im_start|>assistant\n",
                     "Qwen-Qwen3-0.6B": "<|im_start|>assistant\n",
                     "microsoft-Phi-3.5-mini-instruct": "<|assistant|>\n"}


def _tokenizer(template: str) -> Tokenizer:
    tokens, types, merges = byte_level_vocab()
    tokens = [*tokens, "<s>", "</s>"]
    types = [*types, 3, 3]
    return Tokenizer(tokens, merges, types, eos_token_id=len(tokens) - 1, bos_token_id=len(tokens) - 2,
                     chat_template=template)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_the_family_format(name: str) -> None:
    tok = _tokenizer((TEMPLATES / f"{name}.jinja").read_text())
    assert tok.render_chat(CHAT) == EXPECTED[name]
    prompt = GENERATION_PROMPT.get(name)
    if prompt:
        assert tok.render_chat(CHAT[:2]).endswith(prompt)
        assert not tok.render_chat(CHAT[:2], add_generation_prompt=False).endswith(prompt)
