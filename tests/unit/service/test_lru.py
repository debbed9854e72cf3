"""`LRU`, the one bounded mapping under the manager: eviction order, assignment, a lowered bound."""

from __future__ import annotations

from service.lru import LRU


def test_an_lru_beyond_its_bound_drops_its_oldest_keys_and_tells_on_evict() -> None:
    evicted: list[tuple[str, int]] = []
    lru: LRU[str, int] = LRU(2, on_evict=lambda key, value: evicted.append((key, value)))
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 10)  # a use: "a" is now the newest, "b" the oldest
    lru.put("c", 3)
    assert list(lru.items()) == [("a", 10), ("c", 3)]
    assert evicted == [("b", 2)]


def test_assigning_an_existing_lru_key_keeps_its_place_and_a_new_one_is_bounded() -> None:
    lru: LRU[str, int] = LRU(2)
    lru["a"] = 1
    lru["b"] = 2
    lru["a"] = 10  # a correction, not a use: "a" stays the oldest
    lru["c"] = 3
    assert list(lru.items()) == [("b", 2), ("c", 3)]


def test_a_lowered_lru_bound_applies_at_the_next_insertion() -> None:
    lru: LRU[str, int] = LRU(4)
    for i, key in enumerate("abcd"):
        lru[key] = i
    lru.maxsize = 2
    lru["e"] = 4
    assert list(lru) == ["d", "e"]
