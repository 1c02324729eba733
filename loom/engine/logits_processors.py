"""Penalties, biases and token masks applied to a batch of logits before sampling.

Placeholder until the batched implementation lands: rows whose params ask for none of these are
untouched, and the API still rejects the fields, so nothing reaches here unhonored.
"""

from __future__ import annotations

import torch

from loom.engine.request import Request


def apply_logits_processors(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Applies, in place, every penalty / bias / mask the requests ask for."""
    return None
