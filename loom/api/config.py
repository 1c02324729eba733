"""`ServerConfig`: what `loom serve` decides about the HTTP side, frozen before the app is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.api.limits import RequestLimits


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    served_model_names: tuple[str, ...]  # the first is the primary name: responses and `root` use it
    limits: RequestLimits = field(default_factory=RequestLimits)
    cors: CorsConfig = field(default_factory=CorsConfig)
    trust_request_chat_template: bool = False
    tool_call_parser: str | None = None  # None: chosen by model family (hermes when unknown)
    reasoning_parser: str | None = None  # None: chosen by model family (none when unknown)
    structured_outputs_backend: str = "llguidance"  # the grammar engine when a request names none

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
