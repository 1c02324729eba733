"""Prompt and scheduling fields: `truncate_prompt_tokens`, `priority` (422 under fcfs, served under
priority scheduling), `cache_salt` with `usage.prompt_tokens_details.cached_tokens`, `seed` over
int64, and the accepted pass-through fields `vllm_xargs` and `kv_transfer_params`."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from wire import MODEL, complete, post

CAPITAL = "What is the capital of France?"
MAX_MODEL_LEN = 2048  # the suite's server (conftest)


# ---- truncate_prompt_tokens ------------------------------------------------------------------


def test_truncate_prompt_tokens_keeps_the_last_k(base_url: str) -> None:
    full = complete(base_url, CAPITAL, max_tokens=2, return_token_ids=True)
    assert full["usage"]["prompt_tokens"] > 10
    cut = complete(base_url, CAPITAL, max_tokens=2, truncate_prompt_tokens=10, return_token_ids=True)
    assert cut["usage"]["prompt_tokens"] == 10
    assert cut["prompt_token_ids"] == full["prompt_token_ids"][-10:]


def test_truncate_prompt_tokens_above_the_length_changes_nothing(base_url: str) -> None:
    full = complete(base_url, CAPITAL, max_tokens=2)
    same = complete(base_url, CAPITAL, max_tokens=2, truncate_prompt_tokens=1000)
    assert same["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]


def test_truncate_prompt_tokens_minus_one_fits_a_long_prompt_in_the_window(base_url: str) -> None:
    long_text = "word " * (MAX_MODEL_LEN + 100)
    assert post(base_url, long_text, max_tokens=4).status_code == 400  # premise: too long as it is
    resp = complete(base_url, long_text, max_tokens=4, truncate_prompt_tokens=-1)
    assert resp["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 4


def test_truncate_prompt_tokens_zero_is_422(base_url: str) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, truncate_prompt_tokens=0)
    assert resp.status_code == 422, resp.text


# ---- priority --------------------------------------------------------------------------------


def test_nonzero_priority_under_fcfs_is_422(base_url: str) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, priority=1)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "priority"
    assert complete(base_url, CAPITAL, max_tokens=2, priority=0)["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def priority_server(start_server: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    # one running request at a time: everything else waits, so admission order is observable
    with start_server(scheduling_policy="priority", max_model_len=512, max_num_seqs=1) as live:
        yield live


@pytest.mark.slow
def test_priority_is_served_under_priority_scheduling(priority_server: Any) -> None:
    for priority in (-5, 0, 7):
        resp = complete(priority_server.base_url, CAPITAL, temperature=0, max_tokens=4, priority=priority)
        assert resp["usage"]["completion_tokens"] == 4


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the engine never reached the expected state"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_waiting_high_priority_request_is_admitted_before_earlier_low_priority_ones(priority_server: Any) -> None:
    sched = priority_server.engine.core.scheduler
    finished: list[str] = []

    def run(name: str, priority: int, max_tokens: int) -> threading.Thread:
        def call() -> None:
            complete(priority_server.base_url, f"{name}: {CAPITAL}", temperature=0, max_tokens=max_tokens,
                     ignore_eos=True, priority=priority)  # fmt: skip
            finished.append(name)

        thread = threading.Thread(target=call)
        thread.start()
        return thread

    threads = [run("occupant", 0, 96)]
    wait_until(lambda: len(sched.running) == 1)  # the engine is saturated from here on
    threads.append(run("low-1", 5, 4))
    wait_until(lambda: len(sched.waiting) == 1)  # low-1 arrives before low-2
    threads.append(run("low-2", 5, 4))
    wait_until(lambda: len(sched.waiting) == 2)
    threads.append(run("high", -5, 4))
    wait_until(lambda: len(sched.waiting) == 3 or "occupant" in finished)
    for thread in threads:
        thread.join(timeout=300)
    assert finished == ["occupant", "high", "low-1", "low-2"]


# ---- cache_salt and cached_tokens ------------------------------------------------------------


def long_system_prompt() -> list[dict[str, str]]:
    """A fresh ~300-token system prompt (unique per call, so no earlier test has cached it)."""
    session = uuid.uuid4().hex  # first, so that even the first KV block differs from every other call's
    facts = " ".join(f"Fact {i}: the code word number {i} is {uuid.uuid4().hex[:8]}." for i in range(20))
    return [{"role": "system", "content": f"{session} {facts}"}, {"role": "user", "content": CAPITAL}]


def cached(resp: dict[str, Any]) -> int:
    details = resp["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def test_a_repeated_prompt_reuses_the_cache_without_changing_the_answer(base_url: str) -> None:
    messages = long_system_prompt()
    first = complete(base_url, messages, temperature=0, max_tokens=8)
    second = complete(base_url, messages, temperature=0, max_tokens=8)
    assert first["usage"]["prompt_tokens"] > 200
    assert cached(first) == 0
    assert cached(second) > 0
    assert cached(second) <= second["usage"]["prompt_tokens"]
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_cache_salt_keeps_the_cache_private(base_url: str) -> None:
    messages = long_system_prompt()
    salted = complete(base_url, messages, temperature=0, max_tokens=4, cache_salt="tenant-a")
    assert cached(salted) == 0
    assert cached(complete(base_url, messages, temperature=0, max_tokens=4, cache_salt="tenant-a")) > 0
    assert cached(complete(base_url, messages, temperature=0, max_tokens=4, cache_salt="tenant-b")) == 0
    assert cached(complete(base_url, messages, temperature=0, max_tokens=4)) == 0, "unsalted is another tenant"


def test_cached_tokens_in_a_streams_usage(base_url: str) -> None:
    messages = long_system_prompt()
    complete(base_url, messages, temperature=0, max_tokens=2, cache_salt="s")
    body = {
        "model": MODEL, "messages": messages, "max_tokens": 2, "stream": True, "cache_salt": "s",
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: {")]
    usage = json.loads(lines[-1][len("data: ") :])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_empty_cache_salt_is_422(base_url: str) -> None:
    assert post(base_url, CAPITAL, max_tokens=2, cache_salt="").status_code == 422


# ---- seed, user, vllm_xargs, kv_transfer_params ----------------------------------------------


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)], ids=["int64-max", "int64-min"])
def test_seed_over_the_whole_int64_range(base_url: str, seed: int) -> None:
    fields: dict[str, Any] = {"temperature": 1.0, "seed": seed, "n": 2, "max_tokens": 6, "user": "e2e"}
    first = complete(base_url, CAPITAL, **fields)
    second = complete(base_url, CAPITAL, **fields)
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in second["choices"]]


def test_seed_beyond_int64_is_422(base_url: str) -> None:
    assert post(base_url, CAPITAL, max_tokens=2, seed=2**63).status_code == 422


def test_vllm_xargs_keys_no_extension_reads_are_422(base_url: str) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, vllm_xargs={"my_processor_arg": 1})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "vllm_xargs"
    assert complete(base_url, CAPITAL, max_tokens=2, vllm_xargs={})["usage"]["completion_tokens"] == 2


def test_kv_transfer_params_are_accepted_and_answered_null(base_url: str) -> None:
    resp = complete(base_url, CAPITAL, max_tokens=2, kv_transfer_params={"do_remote_decode": True})
    assert resp["kv_transfer_params"] is None
