"""The node's pure admission/eviction policy (engine.core.eviction)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.core import events as ev
from engine.core import node_events as nev
from engine.core.eviction import (
    Capacity,
    NodeState,
    Resident,
    decide,
    evolve_node,
)

MIB = 1 << 20
PLENTY = 1 << 40


def resident(slot: str, mib: int, used: float, **flags: bool) -> Resident:
    return Resident(slot, mib * MIB, measured=True, last_used=used, **flags)


def test_fits_without_evicting() -> None:
    decision = decide("c", 100 * MIB, [resident("a", 100, 1.0)], Capacity(PLENTY))
    assert decision.verdict == "fits" and decision.evict == ()


def test_max_servers_evicts_the_least_recently_used_idle_one() -> None:
    residents = [resident("a", 100, 5.0), resident("b", 100, 1.0)]
    decision = decide("c", 100 * MIB, residents, Capacity(PLENTY, max_servers=2))
    assert decision.verdict == "fits"
    assert [(e.slot, e.cause) for e in decision.evict] == [("b", "capacity")]


def test_memory_limit_evicts_until_it_fits_lru_first() -> None:
    residents = [resident("a", 300, 3.0), resident("b", 300, 1.0), resident("c", 300, 2.0)]
    decision = decide("d", 500 * MIB, residents, Capacity(PLENTY, limit_bytes=1000 * MIB))
    assert [(e.slot, e.cause, e.freed_bytes) for e in decision.evict] == [
        ("b", "memory", 300 * MIB),
        ("c", "memory", 300 * MIB),
    ]


def test_host_memory_counts_and_unmeasured_servers_are_reserved() -> None:
    # 400 MiB free on the host, but an admitted server not measured yet may take 300 of it.
    loading = Resident("a", 300 * MIB, measured=False, last_used=1.0, busy=True)
    decision = decide("b", 200 * MIB, [loading], Capacity(400 * MIB))
    assert decision.verdict == "refused" and decision.blocked_by == ("a",)
    assert "busy" in (decision.error or "")


def test_pinned_and_in_use_are_never_evicted_and_nothing_is_evicted_for_nothing() -> None:
    residents = [
        resident("pinned", 100, 0.0, pinned=True),
        resident("used", 100, 0.5, in_use=True),
        resident("idle", 100, 1.0),
    ]
    decision = decide("new", 100 * MIB, residents, Capacity(PLENTY, max_servers=1))
    assert decision.verdict == "refused"
    assert decision.evict == ()  # evicting "idle" alone would not have been enough
    assert decision.blocked_by == ("used",)
    assert "pinned (pinned" in (decision.error or "") and "used (in use" in (decision.error or "")


def test_the_slots_own_server_is_a_replacement_not_a_resident() -> None:
    residents = [resident("a", 100, 1.0)]
    decision = decide("a", 100 * MIB, residents, Capacity(PLENTY, max_servers=1))
    assert decision.verdict == "fits" and decision.evict == ()


def test_force_admits_anyway_after_evicting_what_helps() -> None:
    residents = [resident("a", 100, 1.0), resident("b", 100, 2.0, pinned=True)]
    decision = decide(
        "c", 900 * MIB, residents, Capacity(PLENTY, limit_bytes=500 * MIB), force=True
    )
    assert decision.verdict == "forced" and [e.slot for e in decision.evict] == ["a"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Resident], Capacity, int]:
    count = draw(st.integers(0, 8))
    residents = [
        Resident(
            f"s{i}",
            draw(st.integers(0, 2000)) * MIB,
            measured=draw(st.booleans()),
            last_used=draw(st.floats(0, 100)),
            pinned=draw(st.booleans()),
            in_use=draw(st.booleans()),
            busy=draw(st.booleans()),
        )
        for i in range(count)
    ]
    capacity = Capacity(
        draw(st.integers(0, 10_000)) * MIB,
        draw(st.none() | st.integers(1, 10_000).map(lambda m: m * MIB)),
        draw(st.none() | st.integers(1, 8)),
    )
    return residents, capacity, draw(st.integers(0, 3000)) * MIB


@given(scenarios())
def test_policy_properties(scenario: tuple[list[Resident], Capacity, int]) -> None:
    residents, capacity, need = scenario
    decision = decide("new", need, residents, capacity)
    by_slot = {r.slot: r for r in residents}
    victims = [by_slot[e.slot] for e in decision.evict]
    assert all(v.evictable for v in victims), "evicted a pinned, in-use or busy server"
    if decision.verdict == "refused":
        assert decision.evict == (), "evicted for nothing"
        return
    order = sorted((r for r in residents if r.evictable), key=lambda r: r.last_used)
    assert victims == order[: len(victims)], "not least recently used first"
    kept = [r for r in residents if r not in victims]
    if capacity.max_servers is not None:
        assert len(kept) + 1 <= capacity.max_servers
    held = sum(r.bytes for r in kept)
    if capacity.limit_bytes is not None:
        assert held + need <= capacity.limit_bytes
    reserved = sum(r.bytes for r in kept if not r.measured)
    freed = sum(v.bytes for v in victims if v.measured)
    assert need <= capacity.free_bytes - reserved + freed


def test_node_state_folds_measurements_evictions_and_pins() -> None:
    spec = ev.LoadSpec(model="/m/a.gguf")
    state = NodeState()
    for event in (
        nev.ServerMeasured(
            at=1.0,
            slot="chat",
            pid=7,
            spec=spec,
            need_key="k",
            planned_bytes=5,
            rss_bytes=3,
            vram_bytes=1,
        ),
        nev.ServerMeasured(
            at=2.0,
            slot="embed",
            pid=8,
            spec=spec,
            need_key="k2",
            planned_bytes=5,
            rss_bytes=2,
            vram_bytes=0,
        ),
        nev.SlotPinned(at=3.0, slot="chat", pinned=True),
        nev.Evicted(at=4.0, slot="embed", cause="ttl", idle_s=9.0, freed_bytes=2),
    ):
        state = evolve_node(state, event)
    assert state.version == 4
    assert state.measured == {"k": 4, "k2": 2}
    assert state.slot("chat").pinned and state.slot("chat").measured_bytes == 4
    assert state.restorable() == ["chat"]  # embed was evicted: not brought back
