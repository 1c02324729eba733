"""`repetition_detection`: a request ends ("stop", stop_reason "repetition_detected") once its output
ends with a pattern of min..max_pattern_size tokens repeated min_count times back to back.

No model: tokens are fed to the scheduler one step at a time.
"""

from __future__ import annotations

import pytest

from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest, Request, RequestStatus
from loom.engine.sampling_params import RepetitionDetection, SamplingParams
from loom.engine.scheduler import REPETITION_STOP_REASON, CoreOutput, Scheduler, SchedulerConfig, ends_in_repetition

EOS = 2


def detection(max_size: int, min_size: int = 1, count: int = 2) -> RepetitionDetection:
    return RepetitionDetection(max_pattern_size=max_size, min_pattern_size=min_size, min_count=count)


def feed(
    tokens: list[int], prompt: tuple[int, ...] = (10, 11, 12, 13), **params: object
) -> tuple[Request, list[CoreOutput]]:
    """Samples `tokens` one per step for one request until it finishes; returns it and its outputs."""
    sched = Scheduler(SchedulerConfig(), KVCacheManager(64, 4))
    params.setdefault("max_tokens", 100)
    req = Request(EngineRequest("r", prompt, SamplingParams(**params)), eos_token_id=EOS)  # type: ignore[arg-type]
    sched.add(req)
    results: list[CoreOutput] = []
    for token in tokens:
        results.extend(sched.update(sched.schedule(), {"r": token}))
        if req.status.finished:
            assert req.block_ids == [] and not sched.has_work
            break
    return req, results


# --- the tail check ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_ids", "params", "expected"),
    [
        ([7, 7], detection(1), True),
        ([7], detection(1), False),  # one occurrence is no repetition
        ([1, 2, 3, 1, 2, 3], detection(3), True),
        ([1, 2, 3, 1, 2], detection(3), False),
        ([1, 2, 3, 1, 2, 3, 9], detection(3), False),  # only the tail counts
        ([1, 2, 3, 1, 2, 3], detection(2), False),  # pattern longer than max_pattern_size
        ([5, 5, 5, 5], detection(3, min_size=2), True),  # "5 5" twice
        ([4, 5, 5, 5], detection(3, min_size=2), False),  # "5" thrice, but single tokens are below min
        ([1, 2, 1, 2, 1, 2], detection(2, count=3), True),
        ([0, 2, 1, 2, 1, 2], detection(2, count=3), False),  # "1 2" only twice in a row
        ([8, 8, 8], detection(1, count=4), False),
        ([8, 8, 8, 8], detection(1, count=4), True),
        ([8, 8, 8, 8], detection(1, count=1), False),  # min_count < 2: off
        ([8, 8, 8, 8], detection(1, min_size=2), False),  # max < min: off
        ([8, 8], detection(1, min_size=0), True),  # min_pattern_size 0 means 1
        ([], detection(3), False),
    ],
)
def test_ends_in_repetition(token_ids: list[int], params: RepetitionDetection, expected: bool) -> None:
    assert ends_in_repetition(token_ids, params) is expected


# --- in the scheduler --------------------------------------------------------------------------


def test_repeated_pattern_ends_the_request_with_stop_and_repetition_reason() -> None:
    stream = [30, 31, 5, 6, 7, 5, 6, 7, 5, 6, 7, 40, 41]
    req, results = feed(stream, repetition_detection=detection(4, min_size=2, count=3))
    assert req.output_ids == stream[:11]  # ended on the token that completed the third "5 6 7"
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert [r.finish_reason for r in results] == [None] * 10 + ["stop"]
    assert results[-1].stop_reason == REPETITION_STOP_REASON == "repetition_detected"


def test_without_repetition_detection_the_same_stream_runs_to_max_tokens() -> None:
    stream = [5, 6, 7] * 5
    req, results = feed(stream, max_tokens=12)
    assert len(req.output_ids) == 12
    assert results[-1].finish_reason == "length" and results[-1].stop_reason is None


def test_non_repeating_output_is_not_stopped() -> None:
    req, results = feed(list(range(20, 40)), max_tokens=20, repetition_detection=detection(5, count=2))
    assert len(req.output_ids) == 20 and results[-1].finish_reason == "length"


def test_repetition_inside_the_prompt_does_not_count() -> None:
    req, results = feed([9, 9, 9], prompt=(9, 9, 9, 9), repetition_detection=detection(1, count=3))
    assert req.output_ids == [9, 9, 9]  # only when the output itself holds three 9s
    assert results[-1].stop_reason == "repetition_detected"


def test_min_tokens_delays_repetition_stop() -> None:
    req, results = feed([7] * 10, min_tokens=5, repetition_detection=detection(1, count=2))
    assert req.output_ids == [7] * 5
    assert results[-1].finish_reason == "stop" and results[-1].stop_reason == "repetition_detected"


def test_eos_and_stop_token_ids_take_precedence_over_repetition() -> None:
    repeat = detection(1, count=2)
    req, results = feed([3, 3], min_tokens=2, stop_token_ids=(3,), repetition_detection=repeat)  # both at once
    assert req.output_ids == [3, 3] and results[-1].stop_reason == 3
    req, results = feed([EOS, EOS], min_tokens=2, repetition_detection=repeat)
    assert req.output_ids == [EOS, EOS] and results[-1].stop_reason is None
