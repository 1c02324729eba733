"""Paged KV cache bookkeeping: a pool of fixed-size blocks, each request's block table, the prefix cache.

Owns which block holds which request's tokens and which full blocks may be shared. Never touches
tensors' contents (the runner owns the cache tensors; a slot number = block_id * block_size +
offset is all they share).

Prefix caching. A block is *full* once all `block_size` of its positions are computed; a full
block is registered under a content hash chained from the start of the sequence:

    root          = sha256(b"loom-kv-root" + salt)   salt: b"\\x00" for None, b"\\x01" + utf-8 of cache_salt
    block_hash[i] = sha256(block_hash[i-1] or root  +  token ids of block i as int64 bytes)

so a hash names a block's tokens *and* every token before them, under one salt: requests share a
block only when their whole prefix up to that block's end and their `cache_salt` are equal (no salt
shares only with no salt). SHA-256 rather than Python's `hash()`, because a salt is a privacy
boundary and tuple hashes of ints can be collided on purpose.

Block lifecycle (`BlockPool`):

    | state     | ref_count | has hash | where                       |
    | empty     | 0         | no       | `_empty` (taken first)      |
    | evictable | 0         | yes      | `_evictable`, LRU order     |
    | in use    | >= 1      | either   | some requests' block tables |

A freed block keeps its hash and contents and stays findable until the pool runs out of empty
blocks and evicts it, least recently freed first. A request's blocks are freed tail first, so a
shared prefix outlives the suffixes that hang off it. Only full, computed blocks are shared and
the runner writes only positions >= `num_computed_tokens`, so a shared block is never written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from loom.engine.request import Request

BlockHash = bytes


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """Full blocks found in the prefix cache for the start of a request, and the tokens they hold."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


NO_PREFIX = CachedPrefix()


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones plus cached ones no request holds."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def allocate(self, count: int) -> list[int] | None:
        """All `count` blocks or none, so a failed allocation leaves the pool unchanged."""
        if count > self.num_free:
            return None
        blocks = [self._take() for _ in range(count)]
        for block_id in blocks:
            self.ref_counts[block_id] = 1
        return blocks

    def _take(self) -> int:
        if self._empty:
            return self._empty.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        self._uncache(block_id)
        return block_id

    def release(self, block_ids: list[int]) -> None:
        """Drops one reference to each block; in the given order, unreferenced ones become reusable."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] > 0:
                continue
            if self._hash_of[block_id] is None:
                self._empty.append(block_id)
            else:
                self._evictable[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._by_hash.get(block_hash)

    def share(self, block_ids: tuple[int, ...]) -> None:
        """Takes one more reference to each cached block (found by `lookup`)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self.ref_counts[block_id] += 1

    def num_evictable_among(self, block_ids: tuple[int, ...]) -> int:
        return sum(1 for block_id in block_ids if self.ref_counts[block_id] == 0)

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Makes a full, computed block findable. A block already cached under this hash keeps the entry."""
        if block_hash in self._by_hash or self._hash_of[block_id] is not None:
            return
        self._by_hash[block_hash] = block_id
        self._hash_of[block_id] = block_hash

    def _uncache(self, block_id: int) -> None:
        block_hash = self._hash_of[block_id]
        if block_hash is not None:
            del self._by_hash[block_hash]
            self._hash_of[block_id] = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._num_registered: dict[str, int] = {}  # req_id -> leading blocks of its table already registered

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """The longest chain of cached full blocks matching the start of `req`'s tokens.

        Leaves at least the last token to compute (its position produces the logits to sample
        from). Requests that want prompt logprobs get no hit: cached positions produce no logits.
        """
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return NO_PREFIX
        max_blocks = (req.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in self._block_hashes(req, max_blocks)[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return CachedPrefix(tuple(block_ids), len(block_ids) * self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> bool:
        """Grows `req.block_ids` to hold its computed tokens plus `num_new_tokens`; False if the pool is short.

        With a `prefix` (only for a request holding no blocks), the table starts with the prefix's
        shared blocks and counts `prefix.num_tokens` as computed; the caller then sets
        `req.num_computed_tokens` to match. All or nothing: a False leaves pool and table unchanged.
        """
        num_computed = prefix.num_tokens if prefix.block_ids else req.num_computed_tokens
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(req.block_ids) - len(prefix.block_ids)
        # shared blocks nobody holds sit in the free count but are about to be held
        if max(needed, 0) > self.pool.num_free - self.pool.num_evictable_among(prefix.block_ids):
            return False
        if prefix.block_ids:
            self.pool.share(prefix.block_ids)
            req.block_ids = list(prefix.block_ids)
            self._num_registered[req.req_id] = len(prefix.block_ids)
        if needed > 0:
            blocks = self.pool.allocate(needed)
            assert blocks is not None  # checked above
            req.block_ids.extend(blocks)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Registers the blocks that `req.num_computed_tokens` has filled since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        first = self._num_registered.get(req.req_id, 0)
        if num_full <= first:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(first, num_full):
            self.pool.register(req.block_ids[i], hashes[i])
        self._num_registered[req.req_id] = num_full

    def free(self, req: Request) -> None:
        self.pool.release(req.block_ids[::-1])  # tail first: the shared prefix is evicted last
        req.block_ids = []
        self._num_registered.pop(req.req_id, None)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def _block_hashes(self, req: Request, num_blocks: int) -> list[BlockHash]:
        """The chained hashes of `req`'s first `num_blocks` full blocks, memoized on the request."""
        hashes = req.block_hashes
        if len(hashes) >= num_blocks:
            return hashes
        bs = self.block_size
        token_ids = req.prompt_ids + req.output_ids
        parent = hashes[-1] if hashes else _root_hash(req.cache_salt)
        for i in range(len(hashes), num_blocks):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes


def _root_hash(cache_salt: str | None) -> BlockHash:
    salt = b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode()
    return hashlib.sha256(b"loom-kv-root" + salt).digest()


def hash_block(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()
