from pathlib import Path

from engine.cli.diagram import MD_NAME, MMD_NAME, markdown, mermaid

DIAGRAMS = Path(__file__).resolve().parents[2] / "diagrams"


def test_committed_diagrams_match_the_machine() -> None:
    text = mermaid()
    assert (DIAGRAMS / MMD_NAME).read_text() == text, "run `make diagrams`"
    assert (DIAGRAMS / MD_NAME).read_text() == markdown(text), "run `make diagrams`"


def test_readme_embeds_the_current_diagram() -> None:
    readme = (DIAGRAMS.parent / "README.md").read_text()
    assert f"```mermaid\n{mermaid()}```" in readme, "README's diagram is stale"


def test_every_state_appears_in_the_diagram() -> None:
    from engine.core.machine import STATES

    text = mermaid()
    for state in STATES:
        assert f" {state} " in text or f"--> {state} " in text
