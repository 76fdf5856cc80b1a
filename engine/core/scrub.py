"""The one scrubber: every string that reaches the journal or a result goes through `scrub`.

It hides what must never be written down: the userinfo of a URL (`https://user:pw@host`),
`Authorization:` / `Bearer` values, Hugging Face and similar tokens, and any extra secret the
caller names (the server's own API key).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

HIDDEN: Final = "***"
# Token shapes a user may paste by mistake; a journal payload matching one is refused outright.
TOKEN_PATTERN: Final = re.compile(
    r"\bhf_[A-Za-z0-9]{30,}|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{30,}"
)
_URL_USERINFO: Final = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_AUTHORIZATION: Final = re.compile(
    r"(?P<name>\b(?:authorization|proxy-authorization)\b[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:bearer|basic|token)\s+)?[^\s\"',;]+",
    re.IGNORECASE,
)
_BEARER: Final = re.compile(r"(?P<name>\bbearer\s+)[^\s\"',;]+", re.IGNORECASE)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret replaced by `***`; `secrets` are literal values to hide too."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, HIDDEN)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m['name']}{HIDDEN}", text)
    text = _BEARER.sub(lambda m: f"{m['name']}{HIDDEN}", text)
    return TOKEN_PATTERN.sub(HIDDEN, text)


def scrub_optional(text: str | None, secrets: Iterable[str] = ()) -> str | None:
    return scrub(text, secrets) if text is not None else None


def looks_secret(text: str) -> bool:
    """A token-shaped string: refused in any request field and in any journal payload."""
    return TOKEN_PATTERN.search(text) is not None
