"""Variant pick, split grouping and projector choice (pure)."""

from __future__ import annotations

import pytest

from engine.core import events as ev
from engine.core.errors import StepFailed
from engine.core.variants import (
    PREFERRED_VARIANTS,
    gguf_candidates,
    pick_mmproj,
    pick_variant,
    quant_tag,
)

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
