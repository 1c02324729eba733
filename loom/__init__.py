"""Loom: a self-hostable, OpenAI-compatible LLM API server with its own inference engine."""

__version__ = "0.1.0"
