"""`Engine.progress()` over a whole load of a real model: sampled every 5 ms while the real
llama-server maps a ~450 MiB model read from disk (its pages evicted from the page cache
first, so mapping takes a measurable time: ~0.5 s here)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from engine.cli.tiny_model import write_tiny_model
from engine.effects import LoadProgress
from engine.orchestrator import Engine

PHASES = ("starting", "loading", "ready")


def _evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_progress_is_monotonic_through_loading_and_reaches_one_at_ready(
    real_engine: Engine, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "wide.gguf", width=2560)
    try:
        _evict_from_page_cache(model)
        assert real_engine.progress() is None  # nothing loads or serves
        samples: list[LoadProgress] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                if (seen := real_engine.progress()) is not None:
                    samples.append(seen)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = real_engine.load({"model_path": str(model)})
            time.sleep(0.05)  # a few samples of the ready server
        finally:
            stop.set()
            sampler.join()
        assert result.status == "loaded", result.error
        fractions = [s.fraction for s in samples]
        assert fractions == sorted(fractions), "progress went backwards"
        phases = [PHASES.index(s.phase) for s in samples]
        assert phases == sorted(phases) and set(phases) == {0, 1, 2}, samples
        assert samples[-1].fraction == 1.0 and samples[-1].phase == "ready"
        assert all(s.fraction < 1.0 for s in samples if s.phase != "ready")
        mapping = {s.fraction for s in samples if s.phase == "loading" and 0 < s.fraction < 0.99}
        assert len(mapping) >= 3, f"the weights were never seen mapping: {sorted(mapping)}"
        ready = samples[-1]
        assert ready.bytes_done == ready.bytes_total == model.stat().st_size
    finally:
        model.unlink()
