"""`loom serve` builds the structured-output backend while the model loads (`warm_structured_outputs`)
and hands it to `create_app`: built after start-up it held the GIL against the first requests."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MODEL

from loom.api.app import warm_structured_outputs
from loom.api.config import ServerConfig
from loom.tokenizer import load_tokenizer


def test_the_default_backend_is_built_before_the_app_exists(model_path: Path) -> None:
    engine = SimpleNamespace(tokenizer=load_tokenizer(model_path))
    config = ServerConfig(served_model_names=(MODEL,))
    structured = warm_structured_outputs(engine, config)  # type: ignore[arg-type]
    assert list(structured.backends._built) == [config.structured_outputs_backend]


def test_a_backend_that_cannot_be_built_is_logged_not_fatal(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = SimpleNamespace(tokenizer=load_tokenizer(model_path))
    config = ServerConfig(served_model_names=(MODEL,), structured_outputs_backend="no-such-backend")
    with caplog.at_level(logging.ERROR):
        structured = warm_structured_outputs(engine, config)  # type: ignore[arg-type]
    assert "no-such-backend" in caplog.text and not structured.backends._built
