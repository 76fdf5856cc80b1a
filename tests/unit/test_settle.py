"""GPU memory settle: `wait_for_settle` driven by a scripted probe on a frozen clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from engine.adapters.gpu import Sample, agree, wait_for_settle
from engine.core import events as ev
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.conftest import rows
from tests.fakes import FakeEffects

KILLED_JUST_NOW = -0.1  # seconds relative to "now" on the frozen monotonic clock


class ScriptedProbe:
    """Returns the scripted samples in order (an exception instance is raised instead);
    each call advances the frozen clock by `cost` seconds, like a real driver call."""

    def __init__(
        self, clock: FrozenDateTimeFactory, script: list[Sample | Exception], cost: float = 0.01
    ) -> None:
        self.clock, self.script, self.cost, self.calls = clock, list(script), cost, 0

    def __call__(self) -> Sample:
        self.calls += 1
        self.clock.tick(self.cost)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return step


@pytest.fixture
def clock() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time("2026-11-26 12:00:00") as frozen:
        yield frozen


def settle(
    clock: FrozenDateTimeFactory,
    probe: Callable[[], Sample],
    since_kill: float | None = KILLED_JUST_NOW,
    **options: float,
) -> tuple[str, float, int]:
    since = 0.0 if since_kill is None else time.monotonic() + since_kill
    outcome = wait_for_settle(probe, since, sleep=lambda s: clock.tick(s), **options)
    return outcome.kind, round(outcome.waited_s, 3), len(outcome.samples)


def test_cold_start_costs_no_probe(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[(0, 1000)]])
    assert settle(clock, probe, since_kill=None) == ("cold", 0.0, 0)
    assert probe.calls == 0


def test_kill_older_than_the_window_costs_no_probe(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[(0, 1000)]])
    assert settle(clock, probe, since_kill=-15.5)[0] == "stale"
    assert probe.calls == 0
    assert settle(clock, probe, since_kill=-14.0)[0] != "stale"


def test_cpu_only_host_stops_after_the_first_empty_sample(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[]])
    assert settle(clock, probe) == ("cpu-only", 0.01, 1)


def test_first_probe_raising_gives_up_at_once(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")])
    assert settle(clock, probe) == ("probe-error", 0.01, 0)


def test_a_reclaim_ramp_settles_on_two_agreeing_samples(clock: FrozenDateTimeFactory) -> None:
    ramp: list[Sample | Exception] = [[(0, 2000)], [(0, 9000)], [(0, 16000)], [(0, 16100)]]
    probe = ScriptedProbe(clock, ramp)
    kind, waited, samples = settle(clock, probe)
    assert (kind, samples) == ("stable", 4)
    assert waited == pytest.approx(3 * 0.25 + 4 * 0.01)


def test_probe_failing_mid_loop_stops_the_wait(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[(0, 2000)], [(0, 9000)], OSError("driver gone")])
    assert settle(clock, probe)[::2] == ("probe-error", 2)


def test_never_settling_gives_up_at_max_wait(clock: FrozenDateTimeFactory) -> None:
    growing = [[(0, 1000 * i)] for i in range(1, 100)]
    probe = ScriptedProbe(clock, list(growing))
    kind, waited, _ = settle(clock, probe, max_wait=2.0)
    assert kind == "timeout" and waited == pytest.approx(2.0, abs=0.02)


def test_a_wedged_probe_cannot_extend_the_wait_past_the_deadline() -> None:
    # Real time: the probe really blocks, and the deadline must still hold.
    def wedged() -> Sample:
        time.sleep(1.0)
        return [(0, 1000)]

    started = time.monotonic()
    outcome = wait_for_settle(wedged, time.monotonic() - 0.1, max_wait=0.2)
    elapsed = time.monotonic() - started
    assert outcome.kind == "timeout" and elapsed < 0.5


def test_slow_probe_time_counts_against_the_deadline(clock: FrozenDateTimeFactory) -> None:
    growing = [[(0, 1000 * i)] for i in range(1, 100)]
    probe = ScriptedProbe(clock, list(growing), cost=0.4)
    kind, waited, samples = settle(clock, probe, max_wait=2.0)
    assert kind == "timeout" and waited <= 2.0 + 0.4
    assert samples < 2.0 / 0.25  # probe time is not free: fewer samples than intervals


def test_a_change_in_the_gpu_set_returns_at_once(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[(0, 1000), (1, 1000)], [(0, 1000)]])
    assert settle(clock, probe)[::2] == ("gpu-change", 2)


def test_one_gpu_still_draining_keeps_the_wait_going(clock: FrozenDateTimeFactory) -> None:
    script: list[Sample | Exception] = [
        [(0, 40000), (1, 5000)],
        [(0, 40000), (1, 30000)],  # GPU 0 stable, GPU 1 still reclaiming
        [(0, 40000), (1, 70000)],
        [(0, 40010), (1, 70100)],
    ]
    probe = ScriptedProbe(clock, script)
    assert settle(clock, probe)[::2] == ("stable", 4)


@pytest.mark.parametrize(
    ("a", "b", "agree_"),
    [
        (80_000, 80_000 - 1_600, True),  # 2 % of an 80 GB card is 1.6 GB
        (80_000, 80_000 - 1_700, False),
        (4_000, 4_000 - 256, True),  # small cards: the 256 MiB floor applies
        (4_000, 4_000 - 300, False),
    ],
)
def test_tolerance_is_the_larger_of_256_mib_and_2_percent(a: int, b: int, agree_: bool) -> None:
    assert agree([(0, a)], [(0, b)]) is agree_
    assert agree([(0, b)], [(0, a)]) is agree_


def test_a_host_known_to_have_no_gpu_costs_no_probe(clock: FrozenDateTimeFactory) -> None:
    probe = ScriptedProbe(clock, [[(0, 1000)]])
    outcome = wait_for_settle(probe, time.monotonic() - 0.1, gpus_present=False)
    assert (outcome.kind, probe.calls) == ("cpu-only", 0)


def _settles(journal_path: Path) -> list[ev.Event]:
    wanted = ("settle_started", "vram_sampled", "settled")
    events = [ev.parse_event(row[4]) for row in rows(journal_path)]
    return [e for e in events if e.type in wanted]


def test_the_kill_time_in_the_journal_arms_the_wait_across_unload_and_restart(
    journal_path: Path, tiny_model: Path
) -> None:
    effects = FakeEffects()
    effects.gpus = [(0, 40_000)]
    request = LoadRequest(model_path=str(tiny_model))
    engine = Engine.open(journal_path, effects=effects, monitor=False)
    engine.load(request)
    engine.unload()  # the Apply path: unload, then load
    engine.load(request)
    engine.close()  # a backend restart: stop everything, then open again
    engine = Engine.open(journal_path, effects=effects, monitor=False)
    engine.load(request)
    engine.close()
    starts = [e for e in _settles(journal_path) if isinstance(e, ev.SettleStarted)]
    outcomes = [e for e in _settles(journal_path) if isinstance(e, ev.Settled)]
    assert [s.kill_age_s is None for s in starts] == [True, False, False]
    assert [o.outcome for o in outcomes] == ["cold", "stable", "stable"]
    assert [o.samples for o in outcomes] == [0, 2, 2]
    samples = [e for e in _settles(journal_path) if isinstance(e, ev.VramSampled)]
    assert len(samples) == 4 and samples[0].free_mib == ((0, 40_000),)


def test_a_cpu_only_host_journals_the_outcome_without_probing(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, _ = fake_engine
    engine.load(LoadRequest(model_path=str(tiny_model)))
    engine.load(LoadRequest(model_path=str(tiny_model), max_seq_length=512))  # kill + reload
    outcomes = [e for e in _settles(journal_path) if isinstance(e, ev.Settled)]
    assert [(o.outcome, o.samples) for o in outcomes] == [("cold", 0), ("cpu-only", 0)]
