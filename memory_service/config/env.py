"""Reads environment values: each parser names the variable and what was expected when a value is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from memory_service.errors import ConfigError

T = TypeVar("T")

MIN_TOKEN_LENGTH = 16
"""Shortest bearer token AUTH_TOKENS accepts."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"`` or ``"7d"``; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


class EnvReader:
    """Parses environment values, naming the variable and the expectation on failure."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def _parse(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name} is expected to be {expected} (got {raw!r})") from None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.optional_integer(name, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_integer(self, name: str, *, minimum: int, maximum: int | None = None) -> int | None:
        bounds = f"an integer from {minimum} to {maximum}" if maximum is not None else f"an integer >= {minimum}"

        def parse(raw: str) -> int:
            value = int(raw)
            if value < minimum or (maximum is not None and value > maximum):
                raise ValueError(raw)
            return value

        return self._parse(name, None, parse, bounds)

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.optional_number(name, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_number(self, name: str, *, minimum: float, maximum: float) -> float | None:
        def parse(raw: str) -> float:
            value = float(raw)
            if not minimum <= value <= maximum:  # also refuses NaN
                raise ValueError(raw)
            return value

        return self._parse(name, None, parse, f"a number from {minimum:g} to {maximum:g}")

    def port_or_off(self, name: str, default: int) -> int | None:
        if (self.text(name) or "").lower() == "off":
            return None
        return self.integer(name, default, minimum=0, maximum=65535)

    def duration(self, name: str, default: float) -> float:
        def parse(raw: str) -> float:
            value = parse_duration(raw)
            if value <= 0:
                raise ValueError(raw)
            return value

        return self._parse(name, default, parse, "a positive duration such as 30s, 250ms, 5m or 1h")

    def boolean(self, name: str, default: bool) -> bool:
        return self._parse(name, default, _parse_bool, "true or false")

    def choice(self, name: str, choices: tuple[str, ...], default: str, *, upper: bool = False) -> str:
        def parse(raw: str) -> str:
            value = raw.upper() if upper else raw.lower()
            if value not in choices:
                raise ValueError(raw)
            return value

        return self._parse(name, default, parse, "one of " + ", ".join(choices))

    def path(self, name: str) -> Path | None:
        raw = self.text(name)
        return None if raw is None else Path(raw).expanduser()

    def token_list(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        tokens = tuple(token.strip() for token in raw.split(",") if token.strip())
        # A value that holds no token (",") must not start the server with auth off: unset means off, nothing else.
        if not tokens or any(len(token) < MIN_TOKEN_LENGTH for token in tokens):
            got = f"one of {min(len(t) for t in tokens)}" if tokens else "no token"
            raise ConfigError(
                f"{name} is expected to hold comma-separated tokens of at least {MIN_TOKEN_LENGTH} characters "
                f"(got {got}); unset it to turn auth off"
            )
        return tokens

    def postgres_url(self, name: str) -> str | None:
        """A ``postgresql://`` URL whose ports are numbers; the driver's own errors would be tracebacks."""
        raw = self.text(name)
        if raw is None:
            return None
        problem = _postgres_url_problem(raw)
        if problem is not None:
            raise ConfigError(
                f"{name} is expected to be a URL such as postgresql://user:password@host:5432/database "
                f"({problem}; got {redact_url(raw)!r})"
            )
        return raw

    def http_url(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{name} is expected to be an http:// or https:// URL such as http://localhost:11434/v1 "
                f"(got {redact_url(raw)!r})"
            )
        return raw


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}{at}{hosts}{slash}{tail}"


def _postgres_url_problem(url: str) -> str | None:
    """Why asyncpg would refuse ``url``, or None; checks the scheme and every host's port (multi-host URLs too)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return "the scheme must be postgresql or postgres"
    netloc = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    for host in netloc.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port:
            digits = port.rpartition(":")[2]
            if not digits.isdigit() or not 0 < int(digits) <= 65535:
                return f"the port {digits!r} is not a number from 1 to 65535"
    return None
