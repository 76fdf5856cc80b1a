"""The hub adapter's pure helpers (the adapter itself: tests/integration/test_hub.py)."""

from __future__ import annotations

from engine.adapters.hub import scrub


def test_scrub_hides_tokens_in_error_text() -> None:
    token = "hf_" + "a1" * 17
    assert token not in scrub(f"401 for url with {token}\nsecond line")
    assert scrub("") == ""
