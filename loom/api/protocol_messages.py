"""Wire models of one chat message and of the tools a request declares.

Owns the `messages[*]` and `tools[*]` shapes of `spec/` (000, 003): typed messages for the roles
system, developer, user, assistant, tool and function; content as a string or a list of parts
(text, image_url, input_audio, file, audio_url, video_url, image/audio embeds, refusal, thinking,
and vLLM's untyped `{"image_url": "..."}` forms); assistant `tool_calls`. It never renders a
prompt or decides what a model can read: a text-only model rejecting an image part is serving's
call.

Choices where the spec pages disagree:
- Custom roles (`CustomChatCompletionMessageParam`) and the harmony `Message` (`author` instead of
  `role`) are not accepted: an unknown role is a 422 naming `messages`, so a typo in a role never
  reaches a chat template silently.
- System, developer and tool messages take text parts only (as the spec types them); user and
  assistant messages take any part, and serving rejects what the model cannot read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class WireModel(BaseModel):
    """Base of request-side wire models: the spec allows extra properties everywhere.

    Strict: `"10"` or `true` is not a number and `1.5` is not an int (no silent coercion), and a
    float must be finite (the JSON parser refuses NaN / Infinity before this; this guards
    callers that build models from Python values).
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True, allow_inf_nan=False)


def _tagged(default: str | None, simple_keys: tuple[str, ...] = ()) -> Discriminator:
    """A union discriminator on `type` that tolerates the spec's untyped forms.

    Bare strings are tagged "string"; a dict without `type` is tagged by the first of
    `simple_keys` it carries, else `default`.
    """

    def tag(value: Any) -> str | None:
        if isinstance(value, str):
            return "string"
        if not isinstance(value, dict):
            return getattr(value, "type", default)
        if "type" in value:
            return str(value["type"])
        return next((key for key in simple_keys if key in value), default)

    return Discriminator(tag)


# ---- content parts ---------------------------------------------------------------------------


class TextPart(WireModel):
    type: Literal["text"] = "text"
    text: str


class ImageURL(WireModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(WireModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL | str  # str: vLLM's simple form {"image_url": "https://..."}
    uuid: str | None = None


class InputAudio(WireModel):
    data: str  # base64
    format: Literal["wav", "mp3"]


class InputAudioPart(WireModel):
    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio


class FileData(WireModel):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(WireModel):
    type: Literal["file"] = "file"
    file: FileData


class MediaURL(WireModel):
    url: str


class AudioURLPart(WireModel):
    type: Literal["audio_url"] = "audio_url"
    audio_url: MediaURL | str


class VideoURLPart(WireModel):
    type: Literal["video_url"] = "video_url"
    video_url: MediaURL | str
    uuid: str | None = None


class ImageEmbedsPart(WireModel):
    type: Literal["image_embeds"] = "image_embeds"
    image_embeds: str | dict[str, str] | None = None
    uuid: str | None = None


class AudioEmbedsPart(WireModel):
    type: Literal["audio_embeds"] = "audio_embeds"
    audio_embeds: str | dict[str, str] | None = None
    uuid: str | None = None


class RefusalPart(WireModel):
    type: Literal["refusal"] = "refusal"
    refusal: str


class ThinkingPart(WireModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    closed: bool | None = None


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImageURLPart, Tag("image_url")]
    | Annotated[InputAudioPart, Tag("input_audio")]
    | Annotated[FilePart, Tag("file")]
    | Annotated[AudioURLPart, Tag("audio_url")]
    | Annotated[VideoURLPart, Tag("video_url")]
    | Annotated[ImageEmbedsPart, Tag("image_embeds")]
    | Annotated[AudioEmbedsPart, Tag("audio_embeds")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[ThinkingPart, Tag("thinking")]
    | Annotated[str, Tag("string")],
    _tagged(None, simple_keys=("image_url", "audio_url", "video_url")),
]

TextContent = str | list[TextPart]
AnyContent = str | list[ContentPart]


# ---- tool calls in the history ---------------------------------------------------------------


class FunctionCall(WireModel):
    name: str
    arguments: str  # JSON text, as the model produced it


class FunctionToolCallParam(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class CustomCall(WireModel):
    name: str
    input: str


class CustomToolCallParam(WireModel):
    id: str
    type: Literal["custom"] = "custom"
    custom: CustomCall


ToolCallParam = Annotated[
    Annotated[FunctionToolCallParam, Tag("function")] | Annotated[CustomToolCallParam, Tag("custom")],
    _tagged("function"),
]


# ---- messages --------------------------------------------------------------------------------


class SystemMessage(WireModel):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(WireModel):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(WireModel):
    role: Literal["user"]
    content: AnyContent
    name: str | None = None


class AssistantAudio(WireModel):
    id: str


class AssistantMessage(WireModel):
    role: Literal["assistant"]
    content: AnyContent | None = None  # None when the turn is only tool calls
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    function_call: FunctionCall | None = None  # deprecated form of tool_calls
    audio: AssistantAudio | None = None
    # earlier reasoning, for templates that replay it; both spellings are on the wire (DESIGN.md)
    reasoning_content: str | None = None
    reasoning: str | None = None


class ToolMessage(WireModel):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(WireModel):
    role: Literal["function"]
    content: str | None
    name: str


ChatMessageParam = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# ---- tools the model may call ----------------------------------------------------------------


class FunctionDefinition(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolParam(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"] = "function"
    function: NamedFunction
