"""What a llama-server binary accepts, read from its own `--help` (pure: the text is an input).

`parse_help(text)` turns the help into `ServerCapabilities`: every flag with its aliases, whether
it takes a value, its metavar and its environment variable. The canonical name of a flag is its
first long alias (`-c, --ctx-size N` -> `--ctx-size`). A boolean pair printed on one entry
(`-kvu, --kv-unified, -no-kvu, --no-kv-unified`) becomes two flags, the negative one knowing
which flag it negates, so that canonicalising never flips a meaning.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

# Column 0: an entry; the description starts after a run of 2+ spaces (or on the next line).
_ENTRY: Final = re.compile(r"^(--?[A-Za-z0-9][\w.-]*(?:,\s+--?[A-Za-z0-9][\w.-]*)*)(.*)$")
_ENV: Final = re.compile(r"\(env: ([A-Z0-9_]+)\)")
_NEGATIVE: Final = re.compile(r"^--?no-?[a-z]")


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """One flag: `aliases` includes the canonical name; `metavar` is "" for a switch."""

    canonical: str
    aliases: tuple[str, ...]
    takes_value: bool
    metavar: str = ""
    values: int = 0  # how many tokens follow it (`--control-vector-layer-range START END`: 2)
    env: str | None = None
    negates: str | None = None  # the canonical name of the flag this one switches off
    help: str = ""

    @property
    def choices(self) -> frozenset[str] | None:
        """Values the metavar enumerates (`{none,linear}`, `[on|off|auto]`, `<0|1>`), if any."""
        found = re.fullmatch(r"\{([^{}]+)\}|\[([^\[\]]+)\]|<([^<>]+)>", self.metavar)
        if found is None:
            return None
        inner = next(g for g in found.groups() if g is not None)
        separator = "," if found.group(1) is not None else "|"
        if separator not in inner:
            return None
        return frozenset(part.strip() for part in inner.split(separator))


@dataclass(frozen=True)
class ServerCapabilities:
    """The flags of one binary, by canonical long name; any alias or spelling is understood."""

    flags: Mapping[str, FlagSpec]
    _by_alias: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {alias: spec.canonical for spec in self.flags.values() for alias in spec.aliases}
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))
        object.__setattr__(self, "_by_alias", MappingProxyType(index))

    def canonical(self, flag: str) -> str | None:
        """The canonical name of `flag` (`-c`, `--ctx_size`, `--ctx-size=8`); None if unknown."""
        return self._by_alias.get(spell(flag))

    def supports(self, flag: str) -> bool:
        return self.canonical(flag) is not None

    def spec(self, flag: str) -> FlagSpec | None:
        canonical = self.canonical(flag)
        return self.flags[canonical] if canonical is not None else None


def spell(flag: str) -> str:
    """How llama.cpp reads a flag token: no `=value`, `_` is `-` in a long flag."""
    name = flag.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def parse_help(text: str) -> ServerCapabilities:
    flags: dict[str, FlagSpec] = {}
    for aliases, metavar, help_text in _entries(text):
        env_match = _ENV.search(help_text)
        env = env_match.group(1) if env_match else None
        description = " ".join(_ENV.sub("", help_text).split())
        values = len(re.sub(r"<[^<>]*>", "x", metavar).split())
        positive, negative = _split_negation(aliases)
        canonical = _canonical(positive)
        flags[canonical] = FlagSpec(
            canonical, positive, bool(metavar), metavar, values, env, None, description
        )
        if negative:
            name = _canonical(negative)
            flags[name] = FlagSpec(name, negative, False, "", 0, env, canonical, description)
    if not flags:
        raise ValueError("no flags found in the --help text")
    return ServerCapabilities(flags)


def _entries(text: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """(aliases, metavar, description) of each entry; continuation lines are indented."""
    current: tuple[tuple[str, ...], str, list[str]] | None = None
    for line in text.splitlines():
        entry = _ENTRY.match(line)
        if entry is None:
            if current is not None and line.startswith(" "):
                current[2].append(line.strip())
            elif current is not None and line.strip():  # a section header ends the entry
                yield current[0], current[1], " ".join(current[2])
                current = None
            continue
        if current is not None:
            yield current[0], current[1], " ".join(current[2])
        aliases = tuple(alias.strip() for alias in entry.group(1).split(","))
        rest = entry.group(2)
        if rest and not rest.startswith(" "):
            continue  # not an entry after all (a flag name glued to other text)
        # One space after the aliases: a metavar follows; a run of spaces: the description.
        metavar, _, description = (
            rest[1:].partition("  ") if rest[1:2] not in ("", " ") else ("", "", rest)
        )
        current = (aliases, metavar.strip(), [description.strip()])
    if current is not None:
        yield current[0], current[1], " ".join(current[2])


def _split_negation(aliases: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Positive and negative aliases of one entry (`--perf, --no-perf`; `-kvo, ..., -nkvo, ...`)."""
    first = next((i for i, a in enumerate(aliases) if _NEGATIVE.match(a)), None)
    if not first:  # none, or the flag is itself a negative spelling (`--no-host`)
        return aliases, ()
    if (
        first >= 2
        and not aliases[first - 1].startswith("--")
        and aliases[first - 2].startswith("--")
    ):
        first -= 1  # a short negative alias printed before its long one (`-nkvo, --no-kv-offload`)
    return aliases[:first], aliases[first:]


def _canonical(aliases: tuple[str, ...]) -> str:
    return next((a for a in aliases if a.startswith("--")), aliases[0])
