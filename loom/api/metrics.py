"""`GET /metrics`: Prometheus text through `prometheus-client`, with vLLM's metric names and meanings.

Owns one registry per app (no global registry: two apps in one process never share a counter),
request-level observations (`RequestTimer`: time to first token, inter-token and end-to-end
latency, prompt and generation tokens, finished requests by reason), the engine's gauges read at
scrape time from a `stats` callable (the engine's `EngineStats` snapshot), and counts of
refusals by status (401, 402, 429, 503) taken from the responses themselves. Labels are the model name, the finish
reason and the status: never a key, an account or a user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.engine import EngineStats

REFUSAL_STATUSES = frozenset({401, 402, 429, 503})
# vLLM's buckets, so dashboards built for it read these the same way
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats()
        label = [self.model_name]
        for name, doc, value, family in (
            ("vllm:num_requests_running", "Requests in the running batch.", s.num_running, GaugeMetricFamily),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting, GaugeMetricFamily),
            ("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", s.kv_cache_usage, GaugeMetricFamily),
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
                CounterMetricFamily,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
                CounterMetricFamily,
            ),
            ("vllm:num_preemptions", "Requests preempted by the scheduler.", s.num_preemptions, CounterMetricFamily),
            (
                "loom:grammar_forced_tokens",
                "Tokens appended by grammar fast-forward without a sampling step.",
                s.num_forced_tokens,
                CounterMetricFamily,
            ),
        ):
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(label, value)
            yield metric


class Metrics:
    """The app's metrics. `stats` (optional) is read at every scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        model = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", model, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests.", [*model, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", model, buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", model, buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", model, buckets=_E2E_BUCKETS, registry=r
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", model, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Generation tokens per request.",
            model,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "loom:refused_requests",
            "Requests refused by status: 401 auth, 402 balance, 429 rate limit, 503 overload.",
            ["status"],
            registry=r,
        )
        if stats is not None:
            r.register(_EngineCollector(model_name, stats))

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's clock: call `tokens(n)` as output arrives, `finish(...)` once at the end."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._started = time.monotonic()
        self._last: float | None = None
        self._finished = False

    def tokens(self, num_tokens: int = 1) -> None:
        if num_tokens <= 0:
            return
        now, m = time.monotonic(), self._metrics
        if self._last is None:
            m.ttft.labels(m.model_name).observe(now - self._started)
            num_tokens -= 1
        elif num_tokens:
            gap = (now - self._last) / num_tokens  # tokens that arrive together shared the wait
            for _ in range(num_tokens):
                m.itl.labels(m.model_name).observe(gap)
        self._last = now

    def finish(self, prompt_tokens: int, generation_tokens: int, finished_reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        m, name = self._metrics, self._metrics.model_name
        m.e2e.labels(name).observe(time.monotonic() - self._started)
        m.prompt_tokens.labels(name).inc(prompt_tokens)
        m.generation_tokens.labels(name).inc(generation_tokens)
        m.request_prompt_tokens.labels(name).observe(prompt_tokens)
        m.request_generation_tokens.labels(name).observe(generation_tokens)
        m.request_success.labels(name, finished_reason).inc()


def install_metrics(app: FastAPI, metrics: Metrics) -> None:
    """`GET /metrics` and the refusal counts (call once in `create_app`)."""

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RefusalCountMiddleware, metrics=metrics)


class RefusalCountMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REFUSAL_STATUSES:
                self.metrics.refusals.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
