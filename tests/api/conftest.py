"""Route tests: the real `create_app` over the toy engine, through FastAPI's `TestClient`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from toy_engine import ToyEngine

from loom.api.app import create_app
from loom.api.config import ServerConfig

MODEL = "toy"


def toy_client(**config: Any) -> TestClient:
    engine = ToyEngine(max_model_len=4096)
    app = create_app(ServerConfig(served_model_names=(MODEL, "org/toy"), **config), engine)  # type: ignore[arg-type]
    app.state.engine = engine  # for tests that look at what reached the engine
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def api() -> Iterator[TestClient]:
    with toy_client() as client:
        yield client


@pytest.fixture
def make_api() -> Callable[..., TestClient]:
    return toy_client


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "ab"}], **fields}
