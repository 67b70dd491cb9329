"""JSON read the way Go's encoding/json fills a struct: an object, field names case-insensitive.

Tailscale peers (ClientInfo, admission replies, key files) are Go programs, so a Python reader
that matched keys exactly would reject what Go accepts (``"Version"`` for ``"version"``).
"""

from __future__ import annotations

import json
import re


def load_object(data: bytes | str) -> dict:
    """Parse a JSON object; keys lower-cased (the last of several spellings wins, as in Go).

    Raises ValueError with a short reason if ``data`` is not a JSON object.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting is hostile input
        raise ValueError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("JSON is not an object")
    return {k.lower(): v for k, v in obj.items()}


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def dumps(obj) -> bytes:
    """Compact JSON byte-identical to Go's json.Marshal: UTF-8 as is, HTML characters escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group()], text).encode()
