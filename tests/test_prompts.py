"""Prompt builder: styles compose, 77-token windows are respected, truncation is reported."""
import pytest

from avatar_engine.prompts import STYLE_TEMPLATES, PromptBuilder
from avatar_engine.requests import STYLE_PRESETS
from avatar_engine.model.tiny import write_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_real_clip_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_every_preset_has_a_template():
    assert set(STYLE_TEMPLATES) == set(STYLE_PRESETS)


def test_style_composes_with_prompt_and_negative(tokenizer):
    built = PromptBuilder([tokenizer]).build("an old sailor", "renaissance", "hat")
    assert "an old sailor" in built.prompt and "renaissance" in built.prompt
    assert built.negative_prompt.startswith("hat") and not built.truncated


def test_long_prompt_drops_style_words_before_user_words(tokenizer):
    user = " ".join(["knight"] * 70)
    built = PromptBuilder([tokenizer]).build(user, "professional")
    assert built.prompt.count("knight") == 70 and not built.truncated
    assert built.dropped_style_words and built.token_counts["prompt"] <= 77


def test_too_long_user_prompt_is_cut_and_reported(tokenizer):
    words = [f"word{i}" for i in range(120)]
    built = PromptBuilder([tokenizer]).build(" ".join(words), "anime")
    assert built.truncated and built.token_counts["prompt"] <= 77
    kept = built.prompt.split()
    assert kept + built.dropped_words == words  # nothing silently lost
    assert built.report()["droppedWords"] == built.dropped_words


def test_tightest_window_of_two_tokenizers(tokenizer):
    builder = PromptBuilder([tokenizer, tokenizer], window=20)
    built = builder.build(" ".join(["dragon"] * 30))
    assert builder.count(built.prompt) <= 20 and built.truncated
