"""The KV-cache pool: LRU slot bookkeeping (no tensors), sizing, and the pool tensors.

Plain CPU code, no model: the slot table is checked with hand-picked episode ids, the sizing
against numbers computed here from the config, and the pool against random keys/values.
"""

from __future__ import annotations

import pytest
import torch
from gr2_policy.engine.kv_pool import (
    CACHE_DTYPES,
    Allocation,
    KVCachePool,
    SlotTable,
    bytes_per_episode,
    slots_for_budget,
)
from gr2_policy.model.config import GR2Config
from gr2_policy.model.kv_cache import EMPTY_STEP
from gr2_policy.model.step_function import step_key_positions, step_write_index

# -- SlotTable ------------------------------------------------------------------------------


def full_table(capacity: int = 4) -> SlotTable:
    """A table holding e0..e{capacity-1}, allocated in that order (e0 least recently used)."""
    table = SlotTable(capacity)
    for i in range(capacity):
        assert table.allocate(f"e{i}") is not None
    return table


def slot(table: SlotTable, episode_id: str) -> int:
    """The slot an episode holds (it must hold one)."""
    held = table.slot_of(episode_id)
    assert held is not None
    return held


def test_allocation_fills_free_slots_with_distinct_slots() -> None:
    table = SlotTable(4)
    allocations = [table.allocate(f"e{i}") for i in range(4)]
    assert all(a is not None and a.evicted is None for a in allocations)
    slots = [a.slot for a in allocations if a is not None]
    assert sorted(slots) == [0, 1, 2, 3]
    assert len(table) == 4
    for i, held in enumerate(slots):
        assert f"e{i}" in table
        assert table.slot_of(f"e{i}") == held
    assert table.slot_of("unknown") is None
    assert "unknown" not in table


def test_reallocating_a_held_episode_keeps_its_slot_without_eviction() -> None:
    table = full_table()
    held = slot(table, "e0")
    assert table.allocate("e0") == Allocation(slot=held, evicted=None)
    assert len(table) == 4
    assert all(f"e{i}" in table for i in range(4))
    # Re-allocating made e0 the most recently used: e1 is evicted next, not e0.
    allocation = table.allocate("new")
    assert allocation is not None
    assert allocation.evicted == "e1"
    assert "e0" in table


def test_full_table_evicts_the_least_recently_used_episode() -> None:
    table = full_table()
    slot_e0 = slot(table, "e0")
    allocation = table.allocate("e4")
    assert allocation == Allocation(slot=slot_e0, evicted="e0")
    assert "e0" not in table
    assert table.slot_of("e0") is None
    assert table.slot_of("e4") == slot_e0
    assert len(table) == 4
    # The next eviction takes the next least recently used one.
    allocation = table.allocate("e5")
    assert allocation is not None
    assert allocation.evicted == "e1"


def test_touch_changes_which_episode_is_evicted() -> None:
    table = full_table()
    table.touch("e0")
    table.touch("e1")
    slot_e2 = slot(table, "e2")
    allocation = table.allocate("e4")
    assert allocation == Allocation(slot=slot_e2, evicted="e2")
    assert "e0" in table
    assert "e1" in table
    allocation = table.allocate("e5")
    assert allocation is not None
    assert allocation.evicted == "e3"
    allocation = table.allocate("e6")
    assert allocation is not None
    assert allocation.evicted == "e0"


def test_pinned_episodes_are_never_evicted() -> None:
    table = full_table()
    table.pin("e0")
    table.pin("e1")
    evicted = []
    for i in range(4, 8):  # churn through the unpinned slots several times
        allocation = table.allocate(f"e{i}")
        assert allocation is not None
        evicted.append(allocation.evicted)
    assert evicted == ["e2", "e3", "e4", "e5"]
    assert "e0" in table
    assert "e1" in table


def test_all_pinned_returns_none_and_changes_nothing() -> None:
    table = full_table()
    for i in range(4):
        table.pin(f"e{i}")
    before = {f"e{i}": slot(table, f"e{i}") for i in range(4)}
    assert table.allocate("e4") is None
    assert "e4" not in table
    assert len(table) == 4
    assert table.usage == 1.0
    assert {f"e{i}": table.slot_of(f"e{i}") for i in range(4)} == before
    # The LRU order is unchanged too: once e0 is unpinned it is the one evicted.
    table.unpin("e0")
    assert table.allocate("e4") == Allocation(slot=before["e0"], evicted="e0")


def test_pins_nest() -> None:
    table = full_table()
    table.pin("e0")
    table.pin("e0")
    table.unpin("e0")  # still pinned once
    allocation = table.allocate("e4")
    assert allocation is not None
    assert allocation.evicted == "e1"
    table.unpin("e0")  # now idle, and still the least recently used
    allocation = table.allocate("e5")
    assert allocation is not None
    assert allocation.evicted == "e0"


def test_pin_of_an_unknown_episode_raises() -> None:
    table = SlotTable(2)
    with pytest.raises(KeyError):
        table.pin("nobody")


def test_free_returns_the_slot_and_it_is_reused() -> None:
    table = full_table()
    slot_e1 = slot(table, "e1")
    assert table.free("e1") == slot_e1
    assert "e1" not in table
    assert len(table) == 3
    assert table.free("e1") is None  # already gone
    assert table.free("never-held") is None
    # The freed slot is handed out without evicting anyone.
    assert table.allocate("e4") == Allocation(slot=slot_e1, evicted=None)
    assert all(f"e{i}" in table for i in (0, 2, 3, 4))


def test_usage() -> None:
    table = SlotTable(4)
    assert table.usage == 0.0
    table.allocate("a")
    assert table.usage == 0.25
    table.allocate("b")
    table.allocate("c")
    table.allocate("d")
    assert table.usage == 1.0
    table.allocate("e")  # evicts: still full
    assert table.usage == 1.0
    table.free("b")
    assert table.usage == 0.75


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_below_one_is_refused(capacity: int) -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        SlotTable(capacity)


# -- sizing ---------------------------------------------------------------------------------

TINY = GR2Config.from_preset("gr2-tiny")
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def hand_bytes_per_episode(cfg: GR2Config, element_size: int) -> int:
    keys = cfg.history * cfg.tokens_per_step
    return 2 * cfg.n_layers * keys * cfg.d_model * element_size + 2 * keys * 8


def test_cache_dtypes() -> None:
    dtypes = dict(CACHE_DTYPES)
    assert dtypes == {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp8": torch.float8_e4m3fn,
    }


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp8"])
def test_bytes_per_episode_of_tiny(name: str) -> None:
    expected = hand_bytes_per_episode(TINY, ELEMENT_SIZE[name])
    assert bytes_per_episode(TINY, CACHE_DTYPES[name]) == expected


def test_bytes_per_episode_of_tiny_literal_and_fp8_quarter() -> None:
    # gr2-tiny: L=4, h=4, P=2+2*8*8=130, d=128 -> 520 key slots.
    assert TINY.tokens_per_step == 130
    assert bytes_per_episode(TINY) == 2 * 4 * 520 * 128 * 4 + 2 * 520 * 8 == 2_138_240
    bookkeeping = 2 * TINY.history * TINY.tokens_per_step * 8
    kv_fp32 = bytes_per_episode(TINY, torch.float32) - bookkeeping
    kv_bf16 = bytes_per_episode(TINY, torch.bfloat16) - bookkeeping
    kv_fp8 = bytes_per_episode(TINY, torch.float8_e4m3fn) - bookkeeping
    assert kv_fp8 * 4 == kv_fp32
    assert kv_bf16 * 2 == kv_fp32


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
def test_pool_nbytes_matches_bytes_per_episode(name: str) -> None:
    pool = KVCachePool(TINY, 2, dtype=CACHE_DTYPES[name])
    assert pool.nbytes == 3 * bytes_per_episode(TINY, CACHE_DTYPES[name])  # 2 slots + scratch


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_slots_for_budget_exact_boundary(name: str, n: int) -> None:
    dtype = CACHE_DTYPES[name]
    per = bytes_per_episode(TINY, dtype)
    budget = (n + 1) * per  # n episodes + the scratch row
    assert slots_for_budget(TINY, budget, dtype) == n
    assert slots_for_budget(TINY, budget - 1, dtype) == n - 1
    assert slots_for_budget(TINY, budget + per - 1, dtype) == n


def test_slots_for_budget_too_small_is_zero() -> None:
    per = bytes_per_episode(TINY, torch.float32)
    assert slots_for_budget(TINY, 0, torch.float32) == 0
    assert slots_for_budget(TINY, per - 1, torch.float32) == 0
    assert slots_for_budget(TINY, per, torch.float32) == 0  # only the scratch row fits


def test_base_fits_episodes_in_80_gb() -> None:
    base = GR2Config.from_preset("gr2-base")
    budget = 80 * 10**9
    counts = {name: slots_for_budget(base, budget, dtype) for name, dtype in CACHE_DTYPES.items()}
    assert all(count > 0 for count in counts.values())
    assert counts["fp8"] >= counts["bf16"] >= counts["fp32"]
    assert counts["fp32"] == budget // hand_bytes_per_episode(base, 4) - 1


# -- KVCachePool ----------------------------------------------------------------------------

L = TINY.n_layers
H = TINY.n_heads
P = TINY.tokens_per_step
DH = TINY.d_model // TINY.n_heads
S = TINY.history * P


def random_kv(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (L, batch, H, P, DH)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_pool_shapes_and_initial_state() -> None:
    pool = KVCachePool(TINY, 3)
    assert pool.scratch == 3
    assert pool.k.shape == (L, 4, H, S, DH)
    assert pool.v.shape == (L, 4, H, S, DH)
    assert pool.key_step.shape == (4, S)
    assert pool.key_step.dtype == torch.long
    assert bool((pool.key_step == EMPTY_STEP).all())
    assert bool((pool.key_pos == 0).all())


def test_pool_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        KVCachePool(TINY, 0)


def test_write_then_gather_returns_the_new_keys_at_the_step_slot() -> None:
    pool = KVCachePool(TINY, 3)
    rows = torch.tensor([0, 2])
    step = torch.tensor([5, 2])
    new_k, new_v = random_kv(2, seed=0)
    pool.write(rows, step, new_k, new_v)

    index = step_write_index(TINY, step)
    # By hand: step 5 -> slot 5 % 4 = 1, keys 130..259; step 2 -> slot 2, keys 260..389.
    assert index[0].tolist() == list(range(130, 260))
    assert index[1].tolist() == list(range(260, 390))

    past_k, past_v, key_step, key_pos = pool.gather(rows, torch.float32)
    assert past_k.shape == (L, 2, H, S, DH)
    assert past_k.dtype == torch.float32
    positions = step_key_positions(TINY, step)
    assert positions[0].tolist() == list(range(5 * 130, 6 * 130))
    for b in range(2):
        idx = index[b]
        assert torch.equal(past_k[:, b, :, idx], new_k[:, b])
        assert torch.equal(past_v[:, b, :, idx], new_v[:, b])
        assert bool((key_step[b, idx] == step[b]).all())
        assert torch.equal(key_pos[b, idx], positions[b])
        # Every other key slot of the row is untouched.
        other = torch.ones(S, dtype=torch.bool)
        other[idx] = False
        assert bool((past_k[:, b, :, other] == 0).all())
        assert bool((past_v[:, b, :, other] == 0).all())
        assert bool((key_step[b, other] == EMPTY_STEP).all())
        assert bool((key_pos[b, other] == 0).all())

    # Rows not written (slot 1 and the scratch row 3) are untouched.
    for row in (1, pool.scratch):
        assert bool((pool.k[:, row] == 0).all())
        assert bool((pool.v[:, row] == 0).all())
        assert bool((pool.key_step[row] == EMPTY_STEP).all())
        assert bool((pool.key_pos[row] == 0).all())


def test_gather_follows_the_row_order() -> None:
    pool = KVCachePool(TINY, 3)
    new_k, new_v = random_kv(2, seed=1)
    pool.write(torch.tensor([0, 1]), torch.tensor([0, 0]), new_k, new_v)
    past_k, past_v, _, _ = pool.gather(torch.tensor([1, 0]), torch.float32)
    idx = torch.arange(P)
    assert torch.equal(past_k[:, 0, :, idx], new_k[:, 1])
    assert torch.equal(past_v[:, 1, :, idx], new_v[:, 0])


def test_writing_step_s_plus_h_overwrites_step_s() -> None:
    pool = KVCachePool(TINY, 2)
    row = torch.tensor([0])
    h = TINY.history
    k1, v1 = random_kv(1, seed=2)
    k2, v2 = random_kv(1, seed=3)
    k3, v3 = random_kv(1, seed=4)
    pool.write(row, torch.tensor([1]), k1, v1)
    pool.write(row, torch.tensor([2]), k2, v2)
    pool.write(row, torch.tensor([1 + h]), k3, v3)

    idx1 = step_write_index(TINY, torch.tensor([1]))[0]
    idx2 = step_write_index(TINY, torch.tensor([2]))[0]
    assert torch.equal(idx1, step_write_index(TINY, torch.tensor([1 + h]))[0])
    past_k, past_v, key_step, key_pos = pool.gather(row, torch.float32)
    assert torch.equal(past_k[:, 0, :, idx1], k3[:, 0])
    assert torch.equal(past_v[:, 0, :, idx1], v3[:, 0])
    assert bool((key_step[0, idx1] == 1 + h).all())
    assert torch.equal(key_pos[0, idx1], step_key_positions(TINY, torch.tensor([1 + h]))[0])
    # Step 2 is still there.
    assert torch.equal(past_k[:, 0, :, idx2], k2[:, 0])
    assert torch.equal(past_v[:, 0, :, idx2], v2[:, 0])
    assert bool((key_step[0, idx2] == 2).all())


def test_reset_empties_only_that_slot() -> None:
    pool = KVCachePool(TINY, 3)
    new_k, new_v = random_kv(2, seed=5)
    pool.write(torch.tensor([0, 1]), torch.tensor([3, 7]), new_k, new_v)
    kept_step = pool.key_step[1].clone()
    kept_pos = pool.key_pos[1].clone()
    pool.reset(0)
    assert bool((pool.key_step[0] == EMPTY_STEP).all())
    assert bool((pool.key_pos[0] == 0).all())
    assert torch.equal(pool.key_step[1], kept_step)
    assert torch.equal(pool.key_pos[1], kept_pos)
    assert bool((kept_step != EMPTY_STEP).sum() == P)


def test_bf16_pool_round_trips_within_bf16_precision() -> None:
    pool = KVCachePool(TINY, 2, dtype=torch.bfloat16)
    assert pool.k.dtype == torch.bfloat16
    new_k, new_v = random_kv(1, seed=6)
    step = torch.tensor([6])
    pool.write(torch.tensor([1]), step, new_k, new_v)
    past_k, past_v, _, _ = pool.gather(torch.tensor([1]), torch.float32)
    assert past_k.dtype == torch.float32
    idx = step_write_index(TINY, step)[0]
    got_k = past_k[:, 0, :, idx]
    got_v = past_v[:, 0, :, idx]
    # Exactly the bf16 rounding of the input ...
    assert torch.equal(got_k, new_k[:, 0].to(torch.bfloat16).float())
    assert torch.equal(got_v, new_v[:, 0].to(torch.bfloat16).float())
    # ... which is within bf16's relative precision (8 significant bits: error <= 2**-9).
    torch.testing.assert_close(got_k, new_k[:, 0], rtol=2**-8, atol=0.0)
    torch.testing.assert_close(got_v, new_v[:, 0], rtol=2**-8, atol=0.0)
    assert not torch.equal(got_k, new_k[:, 0])  # it really was stored in bf16


def test_fp8_pool_round_trips_through_fp8() -> None:
    pool = KVCachePool(TINY, 1, dtype=torch.float8_e4m3fn)
    new_k, new_v = random_kv(1, seed=7)
    step = torch.tensor([0])
    pool.write(torch.tensor([0]), step, new_k, new_v)
    past_k, past_v, _, _ = pool.gather(torch.tensor([0]), torch.float32)
    idx = step_write_index(TINY, step)[0]
    assert torch.equal(past_k[:, 0, :, idx], new_k[:, 0].to(torch.float8_e4m3fn).float())
    assert torch.equal(past_v[:, 0, :, idx], new_v[:, 0].to(torch.float8_e4m3fn).float())
