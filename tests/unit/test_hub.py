"""Variant pick, split grouping and projector choice (pure), and the probe cache's rules."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from freezegun import freeze_time

from engine import events as ev
from engine.effects import Cancelled, CancelToken, StepFailed
from engine.hub import (
    ERROR_RETRY_S,
    PREFERRED_VARIANTS,
    ProbeCache,
    gguf_candidates,
    pick_mmproj,
    pick_variant,
    quant_tag,
    scrub,
)
from engine.journal import Journal

REPO = "owner/Model-GGUF"


def files(*named: tuple[str, int]) -> list[ev.DownloadFile]:
    return [ev.DownloadFile(path=p, size_bytes=s) for p, s in named]


def pick(listing: list[ev.DownloadFile], variant: str | None) -> tuple[str, ...]:
    return pick_variant(gguf_candidates(listing), variant, REPO).files


@pytest.mark.parametrize(
    ("stem", "tag"),
    [
        ("Qwen3-0.6B-Q4_K_M", "Q4_K_M"),
        ("qwen3-0.6b-q8_0", "q8_0"),
        ("llama-2-7b.Q5_K_S", "Q5_K_S"),
        ("Qwen3-0.6B-UD-Q4_K_XL", "UD-Q4_K_XL"),
        ("gemma-3-4b-it-IQ4_XS", "IQ4_XS"),
        ("Qwen3-0.6B-BF16", "BF16"),
        ("Qwen3-0.6B", None),
    ],
)
def test_quant_tag_reads_the_file_name(stem: str, tag: str | None) -> None:
    assert quant_tag(stem) == tag


def test_auto_pick_follows_the_documented_preference_order() -> None:
    listing = files(
        ("m-Q8_0.gguf", 800), ("m-Q5_K_M.gguf", 500), ("m-Q4_K_S.gguf", 420), ("m-F16.gguf", 1600)
    )
    assert PREFERRED_VARIANTS == ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")
    assert pick(listing, None) == ("m-Q4_K_S.gguf",)
    assert pick([*listing, *files(("m-Q4_K_M.gguf", 450))], None) == ("m-Q4_K_M.gguf",)
    assert pick(files(("m-Q8_0.gguf", 800), ("m-F16.gguf", 1600)), None) == ("m-Q8_0.gguf",)


def test_auto_pick_falls_back_to_the_smallest_file() -> None:
    listing = files(("m-F16.gguf", 1600), ("m-IQ2_XS.gguf", 200), ("m-BF16.gguf", 1600))
    assert pick(listing, None) == ("m-IQ2_XS.gguf",)


def test_explicit_variant_is_case_insensitive_and_exact() -> None:
    listing = files(("m-Q4_K_M.gguf", 450), ("m-Q4_K_S.gguf", 420), ("M-q8_0.gguf", 800))
    assert pick(listing, "q4_k_m") == ("m-Q4_K_M.gguf",)
    assert pick(listing, "Q8_0") == ("M-q8_0.gguf",)
    assert pick(listing, "m-Q4_K_S.gguf") == ("m-Q4_K_S.gguf",)
    chosen = pick_variant(gguf_candidates(listing), "q8_0", REPO)
    assert chosen.variant == "q8_0"  # the file's own spelling is what gets journaled


def test_unknown_variant_names_what_the_repo_has() -> None:
    listing = files(("m-Q4_K_M.gguf", 450), ("m-Q8_0.gguf", 800))
    with pytest.raises(StepFailed, match=r"'Q6_K' is not in hub repo .*: Q4_K_M, Q8_0"):
        pick(listing, "Q6_K")
    with pytest.raises(StepFailed, match="is not in hub repo"):
        pick(listing, "Q4_K")  # a prefix of a tag is not that tag


def test_unsloth_dynamic_quant_matches_without_its_prefix() -> None:
    listing = files(("m-UD-Q4_K_XL.gguf", 450), ("m-Q8_0.gguf", 800))
    assert pick(listing, "q4_k_xl") == ("m-UD-Q4_K_XL.gguf",)


def test_split_ggufs_are_one_candidate_with_every_shard_first_shard_first() -> None:
    listing = files(
        ("Q4_K_M/m-Q4_K_M-00002-of-00003.gguf", 100),
        ("Q4_K_M/m-Q4_K_M-00001-of-00003.gguf", 100),
        ("Q4_K_M/m-Q4_K_M-00003-of-00003.gguf", 50),
        ("m-Q8_0.gguf", 800),
    )
    chosen = pick_variant(gguf_candidates(listing), "Q4_K_M", REPO)
    assert chosen.files == (
        "Q4_K_M/m-Q4_K_M-00001-of-00003.gguf",
        "Q4_K_M/m-Q4_K_M-00002-of-00003.gguf",
        "Q4_K_M/m-Q4_K_M-00003-of-00003.gguf",
    )
    assert (chosen.size, chosen.variant) == (250, "Q4_K_M")
    assert pick(listing, None) == chosen.files  # auto-pick prefers Q4_K_M, split or not


def test_a_split_with_a_missing_shard_is_refused_by_number() -> None:
    listing = files(("m-Q4_K_M-00001-of-00003.gguf", 1), ("m-Q4_K_M-00003-of-00003.gguf", 1))
    with pytest.raises(StepFailed, match=r"lacks shard\(s\) 2"):
        pick(listing, "Q4_K_M")


def test_projectors_are_not_models_and_make_a_vision_repo() -> None:
    listing = files(
        ("m-Q4_K_M.gguf", 450),
        ("mmproj-F32.gguf", 90),
        ("mmproj-F16.gguf", 60),
        ("mmproj-BF16.gguf", 60),
    )
    assert [c.files for c in gguf_candidates(listing)] == [("m-Q4_K_M.gguf",)]
    projector = pick_mmproj(listing)
    assert projector is not None and projector.path == "mmproj-F16.gguf"
    assert pick_mmproj(files(("m-Q4_K_M.gguf", 1))) is None


def test_a_repo_without_gguf_is_refused() -> None:
    with pytest.raises(StepFailed, match="has no GGUF model file"):
        pick(files(("model.safetensors", 10), ("mmproj-F16.gguf", 5)), None)


def test_scrub_hides_tokens_in_error_text() -> None:
    token = "hf_" + "a1" * 17
    assert token not in scrub(f"401 for url with {token}\nsecond line")
    assert scrub("") == ""


# --- the probe cache ------------------------------------------------------------------------


def record(key: tuple[str, str | None], **fields: object) -> ev.HubProbed:
    return ev.HubProbed(at=time.time(), key=key[0], token_fingerprint=key[1], **fields)  # type: ignore[arg-type]


def test_concurrent_probes_of_one_key_run_once() -> None:
    cache = ProbeCache(None)
    calls = 0
    release = threading.Event()

    def probe() -> ev.HubProbed:
        nonlocal calls
        calls += 1
        release.wait(2)
        return record(("a/b", None), repo_id="a/b", commit="c" * 40)

    results: list[ev.HubProbed] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.get(("a/b", None), probe, CancelToken()))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join(2)
    assert calls == 1 and len(results) == 4 and len({id(r) for r in results}) == 1


def test_different_keys_never_wait_for_each_other() -> None:
    cache = ProbeCache(None)
    stuck = threading.Event()
    release = threading.Event()

    def slow() -> ev.HubProbed:
        stuck.set()
        release.wait(5)
        return record(("slow/repo", None), error="gone")

    thread = threading.Thread(target=lambda: cache.get(("slow/repo", None), slow, CancelToken()))
    thread.start()
    assert stuck.wait(2)
    t = time.perf_counter()
    other = cache.get(
        ("fast/repo", None), lambda: record(("fast/repo", None), error="x"), CancelToken()
    )
    assert other.error == "x" and time.perf_counter() - t < 0.5
    release.set()
    thread.join(2)


def test_a_waiter_can_be_cancelled() -> None:
    cache = ProbeCache(None)
    release = threading.Event()

    def slow() -> ev.HubProbed:
        release.wait(5)
        return record(("a/b", None), error="x")

    owner = threading.Thread(target=lambda: cache.get(("a/b", None), slow, CancelToken()))
    owner.start()
    time.sleep(0.05)
    token = CancelToken()
    threading.Timer(0.1, token.cancel, args=("stop",)).start()
    with pytest.raises(Cancelled):
        cache.get(("a/b", None), slow, token)
    release.set()
    owner.join(2)


def test_transient_failures_are_shared_but_not_cached() -> None:
    cache = ProbeCache(None)
    attempts = 0

    def flaky() -> ev.HubProbed:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise StepFailed("HTTP 500")
        return record(("a/b", None), error="definitive")

    with pytest.raises(StepFailed, match="HTTP 500"):
        cache.get(("a/b", None), flaky, CancelToken())
    assert cache.cached(("a/b", None)) is None
    assert cache.get(("a/b", None), flaky, CancelToken()).error == "definitive"
    assert cache.get(("a/b", None), flaky, CancelToken()).error == "definitive"
    assert attempts == 2


def test_a_cached_refusal_is_probed_again_after_the_retry_interval() -> None:
    cache = ProbeCache(None)
    with freeze_time("2026-11-26 12:00:00") as clock:
        answers = iter(
            [record(("a/b", None), error="gated"), record(("a/b", None), repo_id="a/b")]
        )
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error == "gated"
        clock.tick(ERROR_RETRY_S - 1)
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error == "gated"
        clock.tick(2)  # the user accepted the repo's terms meanwhile
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error is None


def test_the_cache_lives_in_its_own_journal_stream(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.db")
    try:
        fp = "ab" * 32
        first = ProbeCache(journal)
        first.get(
            ("a/b", fp), lambda: record(("a/b", fp), repo_id="A/b", error="gone"), CancelToken()
        )
        assert journal.streams() == [ev.HUB_PROBE_STREAM]
        assert not ev.is_slot_stream(ev.HUB_PROBE_STREAM)
        again = ProbeCache(journal)  # a restart: read back, no probe
        hit = again.get(("a/b", fp), lambda: pytest.fail("probed again"), CancelToken())
        assert (hit.repo_id, hit.error) == ("A/b", "gone")
        assert again.cached(("a/b", None)) is None  # another token is another key
        # Two caches on one journal (two slots): a write-write race catches up, never fails.
        first.get(("c/d", None), lambda: record(("c/d", None), error="1"), CancelToken())
        again.get(("e/f", None), lambda: record(("e/f", None), error="2"), CancelToken())
        third = ProbeCache(journal)
        assert {k for k in [("a/b", fp), ("c/d", None), ("e/f", None)] if third.cached(k)} == {
            ("a/b", fp),
            ("c/d", None),
            ("e/f", None),
        }
    finally:
        journal.close()
