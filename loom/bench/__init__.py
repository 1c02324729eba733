"""`loom bench`: the serving benchmark, a client of any OpenAI-compatible URL.

Owns the benchmark runs (`serve_bench`: throughput and latency against Hugging Face `generate`;
`soak`: errors and server memory under steady load), the server process they may start
(`server`) and their reports. Never imports the engine, serving or API layers: it talks HTTP like
any client, so it measures what a user would see and can point at peers as well as Loom.
"""
