"""Chat templates: the request-template gate, reserved kwargs, and renders that run in worker
processes a hostile template cannot hold (time, output and memory budgets), with no model."""

from __future__ import annotations

import ast
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom.serving import template_worker
from loom.serving.templates import MAX_KWARGS_BYTES, RESERVED_KWARGS, TemplateRenderer
from loom.serving.types import ChatMessage, InvalidRequest, TemplateOptions

BUDGET_S = 0.5
SLACK_S = 1.5  # a shared 2-core machine: scheduling noise, not the budget, makes up the rest
TOY = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
USER = (ChatMessage("user", "hello"),)
HOSTILE = {
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested_loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string_explosion": "{{ 'a' * 10**9 }}",
    "list_explosion": "{{ ([1] * 10**9)|length }}",
    "huge_power": "{{ 7 ** (10**7) }}",
    "doubling_concat": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "memory_bomb_filter": "{{ 'a'|center(2000000000) }}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'macros.jinja' as m %}",
    "extends": "{% extends '/etc/passwd' %}",
    "raise_exception": "{{ raise_exception('roles must alternate') }}",
    "type_error": "{{ messages[0].content + 1 }}",
    "syntax_error": "{% for m in messages %}",
}


@pytest.fixture(scope="module")
def trusted() -> Iterator[TemplateRenderer]:
    renderer = TemplateRenderer(trust_request_templates=True, time_budget_s=BUDGET_S, num_workers=2)
    yield renderer
    renderer.close()


@pytest.fixture(scope="module")
def untrusted() -> Iterator[TemplateRenderer]:
    renderer = TemplateRenderer(time_budget_s=BUDGET_S, num_workers=1)
    yield renderer
    renderer.close()


def _worker_children() -> set[int]:
    """Live (not zombie) template-worker processes whose parent is this test process."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited while we looked
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and b"template_worker.py" in cmdline:
            found.add(int(entry.name))
    return found


@pytest.mark.parametrize(
    "options",
    [TemplateOptions(chat_template=TOY), TemplateOptions(chat_template_kwargs={"chat_template": TOY})],
    ids=["chat_template", "kwargs_chat_template"],
)
async def test_request_template_is_400_unless_trusted(
    untrusted: TemplateRenderer, trusted: TemplateRenderer, options: TemplateOptions
) -> None:
    with pytest.raises(InvalidRequest) as err:
        await untrusted.render(USER, options, "{{ 'model template' }}", SPECIAL)
    assert (err.value.status_code, err.value.param) == (400, "chat_template")
    assert "--trust-request-chat-template" in err.value.message
    assert await trusted.render(USER, options, "{{ 'model template' }}", SPECIAL) == "<user>hello<assistant>"


@pytest.mark.parametrize("key", sorted(RESERVED_KWARGS - {"chat_template"}) + ["unk_token"])
async def test_kwargs_may_not_set_the_renderers_own_arguments(trusted: TemplateRenderer, key: str) -> None:
    options = TemplateOptions(chat_template_kwargs={key: "x"})
    with pytest.raises(InvalidRequest) as err:
        await trusted.render(USER, options, TOY, {**SPECIAL, "unk_token": "<unk>"})
    assert (err.value.status_code, err.value.param) == (422, "chat_template_kwargs")
    assert f"'{key}'" in err.value.message


async def test_kwargs_over_the_size_cap_are_422(untrusted: TemplateRenderer) -> None:
    options = TemplateOptions(chat_template_kwargs={"notes": "x" * MAX_KWARGS_BYTES})
    with pytest.raises(InvalidRequest) as err:
        await untrusted.render(USER, options, TOY, SPECIAL)
    assert (err.value.status_code, err.value.param) == (422, "chat_template_kwargs")


async def test_other_kwargs_reach_the_model_template(untrusted: TemplateRenderer) -> None:
    template = "{% if enable_thinking %}think{% else %}plain{% endif %}:{{ bos_token }}"
    options = TemplateOptions(chat_template_kwargs={"enable_thinking": True})
    assert await untrusted.render(USER, options, template, SPECIAL) == "think:<s>"


@pytest.mark.parametrize("extra", [{}, {"tool_calls": [{"id": "c1", "type": "function"}]}], ids=["plain", "tool_calls"])
async def test_assistant_content_none_renders_as_empty(
    untrusted: TemplateRenderer, model_template: str, extra: dict[str, object]
) -> None:
    messages = (ChatMessage("user", "hi"), ChatMessage("assistant", None, extra), ChatMessage("user", "again"))
    text = await untrusted.render(messages, TemplateOptions(), model_template, SPECIAL)
    assert "<|im_start|>assistant\n<|im_end|>" in text
    assert "None" not in text


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_template_is_a_plain_4xx_within_the_budget(trusted: TemplateRenderer, source: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRequest) as err:
        await trusted.render(USER, TemplateOptions(chat_template=source), None, SPECIAL)
    assert time.monotonic() - started < BUDGET_S + SLACK_S
    assert (err.value.status_code, err.value.param) == (400, "chat_template")
    assert "Traceback" not in err.value.message and "template_worker" not in err.value.message
    assert "\n" not in err.value.message


async def test_looping_model_template_is_a_4xx_naming_messages(untrusted: TemplateRenderer) -> None:
    with pytest.raises(InvalidRequest) as err:
        await untrusted.render(USER, TemplateOptions(), HOSTILE["nested_loops"], SPECIAL)
    assert (err.value.param, err.value.message) == (
        "messages",
        f"chat template exceeded its time budget ({BUDGET_S:g} s)",
    )
    assert await untrusted.render(USER, TemplateOptions(), TOY, SPECIAL) == "<user>hello<assistant>"


async def test_output_over_its_budget_is_a_4xx() -> None:
    renderer = TemplateRenderer(max_output_chars=1000, time_budget_s=BUDGET_S, num_workers=1)
    try:
        with pytest.raises(InvalidRequest) as err:
            await renderer.render((ChatMessage("user", "x" * 2000),), TemplateOptions(), TOY, SPECIAL)
        assert "over the limit of 1000" in err.value.message
        assert await renderer.render(USER, TemplateOptions(), TOY, SPECIAL) == "<user>hello<assistant>"
    finally:
        renderer.close()


@pytest.fixture(scope="module")
def hf_tokenizer(model_path: Path) -> Any:
    from loom.tokenizer import load_tokenizer

    return load_tokenizer(model_path).hf


@pytest.fixture(scope="module")
def model_template(hf_tokenizer: Any) -> str:
    template = hf_tokenizer.chat_template
    assert isinstance(template, str)
    return template


CONVERSATION = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "What is 2+2? Answer with «quatre», 😀 and a lone \\n."),
    ChatMessage("assistant", "4"),
    ChatMessage("user", "And 3+3?"),
)


async def test_model_template_renders_as_hugging_face_does(
    untrusted: TemplateRenderer, hf_tokenizer: Any, model_template: str
) -> None:
    hf = hf_tokenizer
    plain = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    special = {"bos_token": hf.bos_token, "eos_token": hf.eos_token}
    for add_generation_prompt in (True, False):
        options = TemplateOptions(add_generation_prompt=add_generation_prompt)
        expected = hf.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert await untrusted.render(CONVERSATION, options, model_template, special) == expected
        assert untrusted.render_sync(CONVERSATION, options, model_template, special) == expected


async def test_continue_final_message_cuts_after_the_last_message(
    untrusted: TemplateRenderer, model_template: str
) -> None:
    messages = (ChatMessage("user", "Count:"), ChatMessage("assistant", "1, 2,"))
    options = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    text = await untrusted.render(messages, options, model_template, SPECIAL)
    assert text.endswith("<|im_start|>assistant\n1, 2,")
    with pytest.raises(InvalidRequest) as err:
        await untrusted.render(USER, options, model_template, SPECIAL)
    assert err.value.param == "continue_final_message"


async def test_renders_keep_succeeding_while_a_worker_is_killed(trusted: TemplateRenderer) -> None:
    for _ in range(2):  # the second round runs on the replacement worker too
        looping = trusted.render(USER, TemplateOptions(chat_template=HOSTILE["nested_loops"]), None, SPECIAL)
        normal = [trusted.render((ChatMessage("user", f"m{i}"),), TemplateOptions(), TOY, SPECIAL) for i in range(12)]
        results = await asyncio.gather(looping, *normal, return_exceptions=True)
        assert isinstance(results[0], InvalidRequest) and "time budget" in results[0].message
        assert results[1:] == [f"<user>m{i}<assistant>" for i in range(12)]


async def test_an_overrun_worker_is_replaced_and_close_leaves_no_process() -> None:
    renderer = TemplateRenderer(trust_request_templates=True, time_budget_s=BUDGET_S, num_workers=2)
    renderer.start()
    before = renderer.worker_pids
    assert len(before) == 2 and before <= _worker_children()
    with pytest.raises(InvalidRequest):
        await renderer.render(USER, TemplateOptions(chat_template=HOSTILE["nested_loops"]), None, SPECIAL)
    after = renderer.worker_pids
    assert len(after) == 2 and len(after & before) == 1  # the killed one gone, a fresh one in its place
    in_flight = asyncio.ensure_future(
        renderer.render(USER, TemplateOptions(chat_template=HOSTILE["nested_loops"]), None, SPECIAL)
    )
    await asyncio.sleep(0.1)
    renderer.close()
    with pytest.raises(InvalidRequest) as err:
        await in_flight
    assert err.value.status_code == 503
    assert not _worker_children() & (before | after)
    assert renderer.worker_pids == frozenset()
    with pytest.raises(InvalidRequest) as err:
        await renderer.render(USER, TemplateOptions(), TOY, SPECIAL)
    assert err.value.status_code == 503


def test_worker_imports_only_jinja2_and_the_standard_library() -> None:
    """The worker starts by path in a fresh interpreter: importing Loom would drag torch in."""
    tree = ast.parse(Path(template_worker.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"jinja2"}
