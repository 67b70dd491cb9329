"""Command-line flags in Go's ``flag`` syntax, with ``DERP_*`` environment fallbacks.

Go syntax, so command lines written for the Go derper work unchanged: ``-x v``, ``-x=v``,
``--x``, ``--x=v``; booleans only as ``-x`` or ``-x=false``; parsing stops at the first
non-flag argument or ``--``. Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class UsageError(ConfigError):
    """The command line or environment is wrong; the message says which part and why."""


class HelpRequested(Exception):
    pass


@dataclass(frozen=True)
class Flag:
    name: str
    field: str
    kind: str  # bool | int | float | string | duration
    help: str
    env: tuple[str, ...] = ()


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (e.g. ``1h30m``, ``300ms``, ``0``), in seconds."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r} (use e.g. 10m, 15s, 1h30m)")
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's Duration.String for whole-second values (``10m0s``, ``15s``, ``2s``)."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    frac = seconds - whole
    sec = f"{s + frac:g}s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"invalid boolean {text!r} (use true or false)")


def parse_value(flag: Flag, text: str) -> Any:
    if flag.kind == "bool":
        return parse_bool(text)
    if flag.kind == "int":
        try:
            if re.fullmatch(r"[+-]?0[0-7]+", text):  # Go reads a leading 0 as octal
                return int(text, 8)
            return int(text, 0)
        except ValueError:
            raise ValueError(f"invalid integer {text!r}") from None
    if flag.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"invalid number {text!r}") from None
        if math.isnan(value):
            raise ValueError("NaN is not a valid number here")
        return value
    if flag.kind == "duration":
        return parse_duration(text)
    return text


def parse(flags: list[Flag], argv: list[str],
          environ: Mapping[str, str]) -> tuple[dict[str, Any], set[str], list[str]]:
    """Returns (values by field, fields set explicitly by flag or environment, other args)."""
    by_name = {f.name: f for f in flags}
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for flag in flags:
        for var in flag.env:
            if var in environ and environ[var] != "":
                try:
                    values[flag.field] = parse_value(flag, environ[var])
                except ValueError as e:
                    raise UsageError(f"environment variable {var} (for -{flag.name}): {e}") from e
                explicit.add(flag.field)
                break
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, text = body.partition("=")
        if name in ("h", "help"):
            raise HelpRequested()
        flag = by_name.get(name)
        if flag is None or not name:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not has_value and flag.kind != "bool":
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: -{name}")
            i += 1
            text = argv[i]
        elif not has_value:
            text = "true"
        try:
            values[flag.field] = parse_value(flag, text)
        except ValueError as e:
            raise UsageError(f"invalid value {text!r} for flag -{name}: {e}") from e
        explicit.add(flag.field)
        i += 1
    return values, explicit, argv[i:]


def usage(flags: list[Flag], defaults: Mapping[str, Any]) -> str:
    lines = []
    for flag in sorted(flags, key=lambda f: f.name):
        kind = "" if flag.kind == "bool" else f" {flag.kind}"
        lines.append(f"  -{flag.name}{kind}")
        default = defaults.get(flag.field)
        text = flag.help
        if flag.kind == "duration" and default is not None:
            text += f" (default {format_duration(default)})"
        elif flag.kind == "bool" and default:
            text += " (default true)"
        elif flag.kind == "string" and default:
            text += f' (default "{default}")'
        elif flag.kind in ("int", "float") and default not in (None, 0):
            text += f" (default {default:g})" if flag.kind == "float" else f" (default {default})"
        if flag.env:
            text += "  [$" + ", $".join(flag.env) + "]"
        lines.append("    \t" + text)
    return "\n".join(lines)
