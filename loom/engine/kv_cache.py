"""Paged KV cache bookkeeping: a pool of fixed-size blocks and each request's block table.

Owns which block holds which request's tokens. Never touches tensors' contents (the runner owns
the cache tensors; a slot number = block_id * block_size + offset is all they share).
"""

from __future__ import annotations

from collections import deque

from loom.engine.request import Request


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """All `count` blocks or none, so a failed allocation leaves the pool unchanged."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Grows `req.block_ids` to hold its computed tokens plus `num_new_tokens`; False if the pool is short."""
        needed = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if needed <= 0:
            return True
        blocks = self.pool.allocate(needed)
        if blocks is None:
            return False
        req.block_ids.extend(blocks)
        return True

    def free(self, req: Request) -> None:
        self.pool.release(req.block_ids)
        req.block_ids = []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free
