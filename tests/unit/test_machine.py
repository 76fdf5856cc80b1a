from collections import deque

import pytest

from engine.core.events import EVENT_TYPES
from engine.core.machine import STATES, TRANSITION_TABLE, build_machine


def test_every_event_type_is_a_legal_trigger_somewhere() -> None:
    triggers = {trigger for (_, trigger) in TRANSITION_TABLE}
    assert triggers == set(EVENT_TYPES)


def test_every_state_is_reachable_from_idle() -> None:
    seen, queue = {"idle"}, deque(["idle"])
    while queue:
        state = queue.popleft()
        for (source, _), dest in TRANSITION_TABLE.items():
            if source == state and dest not in seen:
                seen.add(dest)
                queue.append(dest)
    assert seen == set(STATES)


@pytest.mark.parametrize("state", STATES)
def test_compiled_table_agrees_with_the_transitions_machine(state: str) -> None:
    for trigger in EVENT_TYPES:
        machine = build_machine(initial=state)
        model = machine.models[0]
        expected = TRANSITION_TABLE.get((state, trigger))
        if expected is None:
            with pytest.raises(Exception, match="Can't trigger"):
                model.trigger(trigger)
        else:
            model.trigger(trigger)
            assert model.state == expected, (state, trigger)


def test_machine_has_no_conditions() -> None:
    machine = build_machine()
    for event in machine.events.values():
        for transitions in event.transitions.values():
            for transition in transitions:
                assert not transition.conditions  # `unless` guards live here too


def test_evolve_copies_the_state_exactly_like_dataclasses_replace() -> None:
    from dataclasses import fields, replace

    from engine.core.evolve import _copy_with
    from engine.core.state import SlotState

    base = SlotState(extra_args=("--seed", "1"), last_error="boom", last_kill_at=3.0)
    for field in fields(SlotState):
        value = getattr(base, field.name)
        changed = "x" if isinstance(value, str) or value is None else value
        changes = {field.name: changed, "version": 7}
        assert _copy_with(base, dict(changes)) == replace(base, **changes)
    assert _copy_with(base, {}) == base and _copy_with(base, {}) is not base
    with pytest.raises(KeyError):
        _copy_with(base, {"no_such_field": 1})
