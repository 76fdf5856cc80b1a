"""What a llama-server binary accepts, parsed from its own `--help` (pure: text in, facts out).

The shared interface of the capability probe: `ServerCapabilities.flags` maps each flag's
canonical long name (e.g. "--ctx-size") to its aliases, whether it takes a value and its
environment variable; `supports()` accepts any alias or spelling (`_` for `-`, `--x=v`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True, slots=True)
class FlagSpec:
    name: str  # the canonical (long) name
    aliases: tuple[str, ...]  # every spelling --help lists, the canonical one included
    takes_value: bool
    env: str | None = None


def canonical_spelling(flag: str) -> str:
    """How llama.cpp reads a flag: `--flag=value` is `--flag`, `_` is `-` in long names."""
    name = flag.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


@dataclass(frozen=True)
class ServerCapabilities:
    flags: Mapping[str, FlagSpec]
    _by_alias: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._by_alias:
            by_alias = {alias: spec.name for spec in self.flags.values() for alias in spec.aliases}
            object.__setattr__(self, "_by_alias", by_alias)

    def canonical(self, flag: str) -> str | None:
        """The canonical long name of `flag` in any spelling; None if the binary lacks it."""
        return self._by_alias.get(canonical_spelling(flag))

    def supports(self, flag: str) -> bool:
        return self.canonical(flag) is not None


# An option line: aliases separated by ", ", then an optional value placeholder, then help.
_OPTION_LINE: Final = re.compile(r"^(-{1,2}[A-Za-z0-9][^ ,]*(?:,\s+-{1,2}[A-Za-z0-9][^ ,]*)*)(.*)$")
_ENV: Final = re.compile(r"\(env: ([A-Z0-9_]+)\)")


def parse_help(text: str) -> ServerCapabilities:
    """Every flag `llama-server --help` lists, keyed by its first long spelling."""
    flags: dict[str, FlagSpec] = {}
    current: FlagSpec | None = None
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match is None:
            env = _ENV.search(line)
            if env is not None and current is not None and current.env is None:
                current = flags[current.name] = FlagSpec(
                    current.name, current.aliases, current.takes_value, env.group(1)
                )
            continue
        aliases = tuple(a.strip() for a in match.group(1).split(","))
        rest = match.group(2)
        # A value placeholder follows the names after one space (help text after several).
        placeholder = rest[1:].split("  ", 1)[0].strip() if rest.startswith(" ") else ""
        takes_value = bool(placeholder)  # `--fit [on|off]` consumes its value too
        name = next((a for a in aliases if a.startswith("--")), aliases[0])
        env = _ENV.search(rest)
        current = flags[name] = FlagSpec(name, aliases, takes_value, env.group(1) if env else None)
    return ServerCapabilities(flags)
