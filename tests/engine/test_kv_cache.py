"""BlockPool and KVCacheManager: all-or-nothing allocation, whole-block growth, blocks back on free.

No model and no tensors: the cache manager only hands out block ids.
"""

from __future__ import annotations

from loom.engine.kv_cache import BlockPool, KVCacheManager
from loom.engine.request import EngineRequest, Request
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig

BLOCK_SIZE = 4


def make_request(req_id: str, num_prompt_tokens: int) -> Request:
    prompt = tuple(range(10, 10 + num_prompt_tokens))
    return Request(EngineRequest(req_id, prompt, SamplingParams(max_tokens=8)), eos_token_id=2)


# --- BlockPool ---------------------------------------------------------------------------------


def test_pool_starts_with_every_block_free() -> None:
    pool = BlockPool(8)
    assert pool.num_free == 8


def test_pool_allocates_distinct_blocks() -> None:
    pool = BlockPool(8)
    first = pool.allocate(3)
    second = pool.allocate(5)
    assert first is not None and second is not None
    assert len(first) == 3 and len(second) == 5
    assert sorted(first + second) == list(range(8))
    assert pool.num_free == 0


def test_pool_allocation_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) is not None
    assert pool.allocate(2) is None  # one short: nothing is taken
    assert pool.num_free == 1
    assert pool.allocate(1) is not None


def test_pool_release_makes_blocks_reusable() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    assert blocks is not None
    pool.release(blocks)
    assert pool.num_free == 4
    again = pool.allocate(4)
    assert again is not None and sorted(again) == [0, 1, 2, 3]


def test_pool_takes_empty_blocks_before_evicting_cached_ones() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    pool.register(0, b"h0")
    pool.release(blocks)  # 0 stays cached; 1 and 2 are empty
    assert pool.num_free == 3 and pool.lookup(b"h0") == 0
    assert sorted(pool.allocate(2) or []) == [1, 2]
    assert pool.lookup(b"h0") == 0
    assert pool.allocate(1) == [0]  # nothing empty left: the cached block is evicted
    assert pool.lookup(b"h0") is None


def test_pool_evicts_least_recently_freed_cached_block_first() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(1), pool.allocate(1)
    assert a == [0] and b == [1]
    pool.register(0, b"a")
    pool.register(1, b"b")
    pool.release(b)
    pool.release(a)  # "a" is the most recently freed
    assert pool.allocate(1) == [1]
    assert pool.lookup(b"a") == 0 and pool.lookup(b"b") is None


def test_pool_shared_block_leaves_the_free_count_until_released_by_every_holder() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    assert blocks == [0]
    pool.register(0, b"h")
    pool.release(blocks)
    pool.share((0,))
    pool.share((0,))
    assert pool.ref_counts[0] == 2 and pool.num_free == 1
    pool.release([0])
    assert pool.num_free == 1
    pool.release([0])
    assert pool.num_free == 2 and pool.lookup(b"h") == 0


# --- KVCacheManager ----------------------------------------------------------------------------


def test_blocks_needed_rounds_up_to_whole_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_slots_grows_block_table_by_whole_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("a", 5)
    assert kv.allocate_slots(req, 5)
    assert len(req.block_ids) == 2  # 5 tokens -> 2 blocks of 4
    req.num_computed_tokens = 5
    table = list(req.block_ids)

    assert kv.allocate_slots(req, 3)  # 8 tokens still fit in 2 blocks
    assert req.block_ids == table
    req.num_computed_tokens = 8

    assert kv.allocate_slots(req, 1)  # the 9th token opens a third block
    assert req.block_ids[:2] == table and len(req.block_ids) == 3
    assert kv.num_free_blocks == 5


def test_allocate_slots_counts_already_computed_tokens() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("a", 12)
    assert kv.allocate_slots(req, 6)  # first prefill chunk
    assert len(req.block_ids) == 2
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 6)  # second chunk: 12 tokens in all
    assert len(req.block_ids) == 3
    assert len(set(req.block_ids)) == 3


def test_failed_allocate_slots_leaves_pool_and_table_unchanged() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    holder = make_request("holder", 8)
    assert kv.allocate_slots(holder, 8)
    req = make_request("a", 4)
    assert kv.allocate_slots(req, 4)
    req.num_computed_tokens = 4
    assert not kv.allocate_slots(req, 8)  # needs 2 more blocks, 0 free
    assert req.block_ids and len(req.block_ids) == 1
    assert kv.num_free_blocks == 0

    big = make_request("big", 9)
    kv.free(req)
    assert not kv.allocate_slots(big, 9)  # needs 3 blocks, only 1 free: takes none
    assert big.block_ids == []
    assert kv.num_free_blocks == 1


def test_free_returns_blocks_and_clears_table() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    req = make_request("a", 10)
    assert kv.allocate_slots(req, 10)
    assert kv.num_free_blocks == 1
    kv.free(req)
    assert req.block_ids == []
    assert kv.num_free_blocks == 4


def test_free_blocks_return_to_pool_after_abort() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    running, waiting = make_request("running", 10), make_request("waiting", 3)
    sched.add(running)
    sched.schedule()
    sched.add(waiting)
    assert kv.num_free_blocks == 5

    aborted = sched.abort("running")
    assert aborted is running and running.block_ids == []
    assert running.status.finish_reason == "abort"
    assert kv.num_free_blocks == 8
    assert sched.abort("waiting") is waiting
    assert kv.num_free_blocks == 8
    assert not sched.has_work


def test_freed_blocks_are_reused_by_the_next_request() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    first, second = make_request("first", 8), make_request("second", 8)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert [r.req_id for r, _ in out.scheduled] == ["first"]  # the pool holds only one of them
    blocks = list(first.block_ids)
    sched.abort("first")
    out = sched.schedule()
    assert [r.req_id for r, _ in out.scheduled] == ["second"]
    assert sorted(second.block_ids) == sorted(blocks)
