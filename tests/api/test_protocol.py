"""Wire models: every spec field parses with its default, bad values name their field, the
unsupported-field table, and responses the official openai SDK can read."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from loom.api.protocol import (
    HONORED_FIELDS,
    ChatCompletionRequest,
    ignored_extra_fields,
    resolved_max_tokens,
    resolved_tool_choice,
    unsupported_fields,
)
from loom.api.protocol_messages import (
    AssistantMessage,
    ImageURLPart,
    TextPart,
    ThinkingPart,
)
from loom.api.protocol_response import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

USER = [{"role": "user", "content": "hi"}]

# Request properties of spec 000 and 003, plus 001's `reasoning_content`.
SPEC_REQUEST_FIELDS = [
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "include_reasoning",
    "parallel_tool_calls",
    "user",
    "best_of",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "priority",
    "request_id",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
    "repetition_detection",
    "reasoning_content",
]


def parse(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def error_locs(**fields: Any) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        parse(**fields)
    return [tuple(err["loc"]) for err in info.value.errors()]


# ---- request shape ---------------------------------------------------------------------------


def test_every_spec_request_field_is_declared() -> None:
    missing = set(SPEC_REQUEST_FIELDS) - set(ChatCompletionRequest.model_fields)
    assert not missing


def test_honored_fields_are_request_fields() -> None:
    assert set(ChatCompletionRequest.model_fields) >= HONORED_FIELDS


def test_plain_request_gets_spec_defaults() -> None:
    req = parse()
    assert (req.n, req.stream, req.logprobs, req.echo) == (1, False, False, False)
    assert (req.temperature, req.top_p, req.top_k, req.min_p) == (None, None, None, None)
    assert (req.add_generation_prompt, req.add_special_tokens) == (True, False)
    assert (req.skip_special_tokens, req.spaces_between_special_tokens) == (True, True)
    assert (req.priority, req.include_reasoning, req.tool_choice) == (0, True, "none")


def test_model_may_be_omitted() -> None:
    assert ChatCompletionRequest.model_validate({"messages": USER}).model is None


def test_unknown_fields_are_kept_and_listed() -> None:
    req = parse(my_field=1, another={"x": 2})
    assert req.model_extra == {"my_field": 1, "another": {"x": 2}}
    assert ignored_extra_fields(req) == ["another", "my_field"]
    assert unsupported_fields(req) == []


def test_every_role_and_content_part_parses() -> None:
    messages = [
        {"role": "system", "content": "be brief", "name": "rules"},
        {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "low"}},
                {"image_url": "https://x/simple.png"},
                {"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}},
                {"type": "file", "file": {"file_id": "f1"}},
                {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hmm", "closed": True}],
            "reasoning_content": "earlier thoughts",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "function", "content": "old style", "name": "f"},
    ]
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    user_parts = req.messages[2].content
    assert isinstance(user_parts, list)
    assert isinstance(user_parts[0], TextPart) and isinstance(user_parts[2], ImageURLPart)
    assistant = req.messages[3]
    assert isinstance(assistant, AssistantMessage) and assistant.tool_calls is not None
    assert isinstance(assistant.content, list) and isinstance(assistant.content[0], ThinkingPart)


def test_assistant_turn_may_be_only_tool_calls_without_type() -> None:
    call = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}
    req = parse(messages=[*USER, {"role": "assistant", "tool_calls": [call]}])
    assistant = req.messages[1]
    assert isinstance(assistant, AssistantMessage) and assistant.content is None
    assert assistant.tool_calls is not None and assistant.tool_calls[0].type == "function"


def test_all_structured_output_spellings_parse() -> None:
    schema = {"type": "object"}
    req = parse(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        structured_outputs={"json": schema, "_backend": "xgrammar"},
        guided_json=schema,
        guided_choice=["a", "b"],
    )
    assert req.response_format is not None and req.structured_outputs is not None
    assert req.response_format.json_schema.json_schema == schema  # type: ignore[union-attr]
    assert req.structured_outputs.json_spec == schema
    assert parse(
        response_format={"type": "structural_tag", "format": {"type": "x"}}
    ).response_format
    legacy = {
        "type": "structural_tag",
        "structures": [{"begin": "<a>", "end": "</a>"}],
        "triggers": ["<a>"],
    }
    assert parse(response_format=legacy).response_format


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_out_of_range_value_names_its_field(fields: dict[str, Any], bad_field: str) -> None:
    assert error_locs(**fields) == [(bad_field,)]


def test_boundary_values_are_accepted() -> None:
    req = parse(temperature=0, top_p=1, top_k=-1, min_p=0, n=20, presence_penalty=-2, max_tokens=1)
    assert req.top_k == -1
    assert parse(continue_final_message=True, add_generation_prompt=False).continue_final_message


def test_empty_messages_are_rejected() -> None:
    assert ("messages",) in error_locs(messages=[])


def test_unknown_role_is_rejected() -> None:
    assert ("messages", 0) in error_locs(messages=[{"role": "wizard", "content": "hi"}])


def test_image_part_in_system_message_is_rejected() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x"}}
    locs = error_locs(messages=[{"role": "system", "content": [image]}])
    assert all(loc[:2] == ("messages", 0) for loc in locs)


def test_json_schema_format_needs_its_schema() -> None:
    assert error_locs(response_format={"type": "json_schema"})[0][0] == "response_format"


# ---- helpers ---------------------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert resolved_max_tokens(parse(max_tokens=10, max_completion_tokens=20)) == 20
    assert resolved_max_tokens(parse(max_tokens=10)) == 10
    assert resolved_max_tokens(parse()) is None


def test_tool_choice_defaults_to_auto_only_with_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert resolved_tool_choice(parse()) == "none"
    assert resolved_tool_choice(parse(tools=tools)) == "auto"
    assert resolved_tool_choice(parse(tools=tools, tool_choice="none")) == "none"


def test_plain_request_with_honored_fields_has_nothing_unsupported() -> None:
    req = parse(
        max_tokens=5, temperature=0.3, top_p=0.9, top_k=5, min_p=0.1, seed=1, n=2, stop=["x"],
        stop_token_ids=[2], ignore_eos=True, min_tokens=1, stream=True,
        stream_options={"include_usage": True}, request_id="r", user="u",
        chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip
    assert unsupported_fields(req) == []


def test_off_values_of_unhonored_fields_are_not_unsupported() -> None:
    req = parse(
        logprobs=False, top_logprobs=0, presence_penalty=0, frequency_penalty=0.0,
        repetition_penalty=1, best_of=2, n=2, use_beam_search=False, tools=[], tool_choice="auto",
        parallel_tool_calls=False, response_format={"type": "text"}, logit_bias={}, priority=0,
        echo=False, store=False, service_tier="auto", metadata={"k": "v"}, documents=None,
        include_reasoning=True, repetition_detection={"max_pattern_size": 0},
    )  # fmt: skip
    assert unsupported_fields(req) == []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"modalities": ["text", "audio"]}, ["modalities"]),
        ({"prediction": {"type": "content", "content": "x"}, "logprobs": True}, ["prediction"]),
        ({"service_tier": "flex"}, ["service_tier"]),
    ],
)
def test_unhonored_fields_in_use_are_named(fields: dict[str, Any], expected: list[str]) -> None:
    assert unsupported_fields(parse(**fields)) == expected


# ---- responses parse with the openai SDK -----------------------------------------------------


def completion(**message: Any) -> ChatCompletionResponse:
    logprob = TokenLogprob(
        token="Hi",
        logprob=-0.1,
        bytes=[72, 105],
        top_logprobs=[TopLogprob(token="Hi", logprob=-0.1)],
    )
    choice = ChatCompletionChoice(
        index=0,
        message=ChatMessage(**message),
        logprobs=ChoiceLogprobs(content=[logprob]),
        finish_reason="stop",
        token_ids=[1, 2],
    )
    usage = Usage(
        prompt_tokens=3,
        completion_tokens=2,
        total_tokens=5,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
    )
    return ChatCompletionResponse(model="m", choices=[choice], usage=usage)


def test_completion_parses_with_openai_sdk() -> None:
    resp = completion(content="Hi.", reasoning_content="think", reasoning="think")
    parsed = ChatCompletion.model_validate(resp.model_dump())
    assert parsed.choices[0].message.content == "Hi."
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert logprobs.content[0].top_logprobs[0].token == "Hi"
    assert parsed.usage is not None and parsed.usage.total_tokens == 5
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"


def test_tool_call_completion_parses_with_openai_sdk() -> None:
    call = ToolCall(function=FunctionCallOut(name="f", arguments='{"x": 1}'))
    resp = completion(content=None, tool_calls=[call])
    parsed = ChatCompletion.model_validate_json(resp.model_dump_json())
    assert parsed.choices[0].message.tool_calls[0].function.name == "f"  # type: ignore[index, union-attr]


def test_stream_chunks_parse_with_openai_sdk() -> None:
    chunks = [
        ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content="")),
        ChatCompletionStreamChoice(
            index=0, delta=DeltaMessage(reasoning_content="r", reasoning="r")
        ),
        ChatCompletionStreamChoice(
            index=0,
            delta=DeltaMessage(
                tool_calls=[
                    DeltaToolCall(
                        index=0,
                        id="c",
                        type="function",
                        function=DeltaFunctionCall(name="f", arguments="{"),
                    )
                ]
            ),
        ),
        ChatCompletionStreamChoice(
            index=0, delta=DeltaMessage(), finish_reason="length", token_ids=[7]
        ),
    ]
    for choice in chunks:
        chunk = ChatCompletionStreamResponse(id="chatcmpl-1", model="m", choices=[choice])
        parsed = ChatCompletionChunk.model_validate(chunk.model_dump())
        assert parsed.object == "chat.completion.chunk"
    usage_chunk = ChatCompletionStreamResponse(
        id="chatcmpl-1", model="m", choices=[], usage=Usage(total_tokens=1)
    )
    assert ChatCompletionChunk.model_validate(usage_chunk.model_dump()).usage is not None


def test_model_list_parses_with_openai_sdk() -> None:
    models = ModelList(data=[ModelCard(id="SmolLM2-135M-Instruct", max_model_len=8192)])
    dumped = models.model_dump()
    assert dumped["object"] == "list"
    assert Model.model_validate(dumped["data"][0]).id == "SmolLM2-135M-Instruct"


def test_response_models_reject_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        ChatMessage(contnet="typo")  # type: ignore[call-arg]
