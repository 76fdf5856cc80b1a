"""The load progress fraction: monotonic, the download half the bar, 1.0 only when ready."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.core.progress import ProgressMark


def test_download_is_half_then_mapping_then_ready() -> None:
    mark = ProgressMark().advance("a", 0, 1000, ready=False, downloaded=0.5)
    assert mark.fraction == 0.25
    mark = mark.advance("a", 500, 1000, ready=False, downloaded=1.0)
    assert mark.fraction == 0.75
    mark = mark.advance("a", 1000, 1000, ready=False, downloaded=1.0)
    assert mark.fraction == 0.995  # mapped is not healthy yet
    assert mark.advance("a", 0, 1000, ready=True, downloaded=1.0).fraction == 1.0


def test_a_new_load_starts_again_from_zero() -> None:
    mark = ProgressMark().advance("a", 900, 1000, ready=False, downloaded=None)
    assert mark.advance("b", 100, 1000, ready=False, downloaded=None).fraction == 0.1


@given(st.lists(st.tuples(st.integers(0, 2000), st.floats(0, 1), st.booleans()), max_size=30))
def test_the_fraction_never_goes_backwards(samples: list[tuple[int, float, bool]]) -> None:
    mark = ProgressMark()
    for mapped, downloaded, ready in samples:
        after = mark.advance("a", mapped, 1000, ready=ready, downloaded=downloaded)
        assert after.fraction >= mark.fraction and 0.0 <= after.fraction <= 1.0
        mark = after
