"""A strict reader of the YAML that Headscale DERP map files use, so checking one needs no PyYAML.

The subset: block mappings and sequences (``- key: value`` items included), plain, single- and
double-quoted scalars, integers, floats, booleans, null, empty ``[]``/``{}``, ``#`` comments and
a leading ``---``. That covers what ``derper derpmap`` writes and what Headscale's documentation
shows. Anything else (anchors, tags, block scalars, flow collections with content, tabs) is an
error naming the line, never a guess: a checker must not read a file differently from Headscale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False,
          "FALSE": False}
_NULLS = ("", "~", "null", "Null", "NULL")


class YAMLError(ValueError):
    """The text is not in the subset; the message names the line."""


@dataclass
class _Line:
    number: int
    indent: int
    text: str


def load(text: str) -> object:
    """The document as dicts (keys as written, always strings), lists and scalars."""
    lines = _lines(text)
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0].indent)
    if end < len(lines):
        raise YAMLError(f"line {lines[end].number}: unexpected indentation")
    return value


def _lines(text: str) -> list[_Line]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        body = _strip_comment(raw, number).rstrip()
        stripped = body.lstrip(" ")
        if not stripped:
            continue
        if stripped.startswith("\t") or "\t" in body[:len(body) - len(stripped)]:
            raise YAMLError(f"line {number}: tabs are not allowed in indentation")
        if stripped in ("---", "...") and body == stripped:
            if out or stripped == "...":
                raise YAMLError(f"line {number}: only one YAML document is supported")
            continue
        out.append(_Line(number, len(body) - len(stripped), stripped))
    return out


def _strip_comment(raw: str, number: int) -> str:
    quote = ""
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote and (quote == "'" or raw[i - 1] != "\\"):
                quote = ""
        elif ch in "\"'" and (i == 0 or raw[i - 1] in " :-[{,"):
            quote = ch
        elif ch == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i]
    return raw


def _block(lines: list[_Line], i: int, indent: int) -> tuple[object, int]:
    if _is_item(lines[i].text):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _mapping(lines: list[_Line], i: int, indent: int) -> tuple[dict, int]:
    result: dict = {}
    while i < len(lines) and lines[i].indent == indent and not _is_item(lines[i].text):
        line = lines[i]
        key, rest = _split_key(line)
        if key in result:
            raise YAMLError(f"line {line.number}: key {key!r} appears twice")
        i += 1
        if rest:
            result[key] = _scalar(rest, line.number)
        elif i < len(lines) and (lines[i].indent > indent
                                 or (lines[i].indent == indent and _is_item(lines[i].text))):
            result[key], i = _block(lines, i, lines[i].indent)
        else:
            result[key] = None
    if i < len(lines) and lines[i].indent > indent:
        raise YAMLError(f"line {lines[i].number}: unexpected indentation")
    return result, i


def _sequence(lines: list[_Line], i: int, indent: int) -> tuple[list, int]:
    result = []
    while i < len(lines) and lines[i].indent == indent and _is_item(lines[i].text):
        line = lines[i]
        item = line.text[1:].lstrip(" ")
        if not item:
            i += 1
            if i < len(lines) and lines[i].indent > indent:
                value, i = _block(lines, i, lines[i].indent)
            else:
                value = None
        elif _is_item(item) or _looks_like_key(item):
            # "- key: value": the item is a block starting in this line's column after "- "
            lines[i] = _Line(line.number, indent + len(line.text) - len(item), item)
            value, i = _block(lines, i, lines[i].indent)
        else:
            value, i = _scalar(item, line.number), i + 1
        result.append(value)
    return result, i


def _looks_like_key(text: str) -> bool:
    if text[0] in "\"'":
        end = _quoted_end(text)
        return end > 0 and text[end + 1:end + 2] == ":"
    return ": " in text or text.endswith(":")


def _quoted_end(text: str) -> int:
    """Index of the closing quote of the quoted scalar ``text`` starts with; -1 if none."""
    quote, i = text[0], 1
    while i < len(text):
        if text[i] == "\\" and quote == '"':
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i
        i += 1
    return -1


def _split_key(line: _Line) -> tuple[str, str]:
    text = line.text
    if text[0] in "\"'":
        end = _quoted_end(text)
        if end < 0 or text[end + 1:end + 2] != ":":
            raise YAMLError(f"line {line.number}: expected \"key: value\"")
        key = _scalar(text[:end + 1], line.number)
        rest = text[end + 2:]
    else:
        at = text.find(": ")
        if at < 0:
            if not text.endswith(":"):
                raise YAMLError(f"line {line.number}: expected \"key: value\", got {text!r}")
            at = len(text) - 1
        key, rest = text[:at].rstrip(), text[at + 1:]
        if key[:1] in "?&*!|>[{@`%":
            raise YAMLError(f"line {line.number}: complex keys are not supported")
    return str(key), rest.strip()


def _scalar(text: str, number: int) -> object:
    if text[0] == '"':
        if _quoted_end(text) != len(text) - 1:
            raise YAMLError(f"line {number}: text after a quoted string")
        try:
            return json.loads(text)
        except ValueError:
            raise YAMLError(f"line {number}: bad double-quoted string") from None
    if text[0] == "'":
        if _quoted_end(text) != len(text) - 1:
            raise YAMLError(f"line {number}: text after a quoted string")
        return text[1:-1].replace("''", "'")
    if text in ("[]", "{}"):
        return [] if text == "[]" else {}
    if text[0] in "[{&*!|>%@`":
        raise YAMLError(f"line {number}: flow collections, anchors, aliases, tags and block "
                        "scalars are not supported here; write plain block YAML")
    if text in _NULLS:
        return None
    if text in _BOOLS:
        return _BOOLS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if ": " in text:
        raise YAMLError(f"line {number}: a mapping cannot start here")
    return text
