"""One log line per event, ``key=value``, that journald and grep both read well.

Under systemd (``JOURNAL_STREAM`` set) lines carry a ``<N>`` syslog priority prefix instead of a
timestamp, so journald records the right level and does not show two clocks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from .admission.limits import TokenBucket

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


_NEEDS_QUOTES = re.compile(r'[ "=\\\n\t]').search


def _quote(value: object) -> str:
    text = str(value)
    if text and not _NEEDS_QUOTES(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journald: bool, tag: str = "") -> None:
        super().__init__()
        self.journald = journald
        self.tag = tag  # fields on every line (worker=N under -workers)
        self._second: int | None = None  # the whole second _stamp was formatted for
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journald:
            parts.append(f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>")
        else:
            second = int(record.created)
            if second != self._second:  # one strftime per second, not per line
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            parts.append(f"time={self._stamp}.{int(record.msecs):03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for k, v in getattr(record, "fields", {}).items():
            if v is not None:
                parts.append(f"{k}={_quote(v)}")
        if self.tag:
            parts.append(self.tag)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append(f"exception={_quote(f'{type(exc).__name__}: {exc}')}")
        return " ".join(parts)


def setup(level: str = "info", stream=None, **tag: object) -> None:
    """Log ``key=value`` lines to stderr; ``tag`` fields end every line (``worker=1``)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter(journald=bool(os.environ.get("JOURNAL_STREAM")),
                                           tag=" ".join(f"{k}={_quote(v)}"
                                                        for k, v in tag.items())))
    root = logging.getLogger("derper")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
    # Our lines show none of these; a record would look each of them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


class EventLogger:
    """``log.info("client connected", key=..., remote=...)``: the message plus fields."""

    __slots__ = ("_log",)

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, msg: str, fields: dict, exc_info=None) -> None:
        # makeRecord + handle is what Logger.log does, less finding the caller's source line
        # (a walk up the stack our formatter never prints; one line per connect pays it).
        log = self._log
        if log.isEnabledFor(level):
            log.handle(log.makeRecord(log.name, level, "", 0, msg, (), exc_info,
                                      extra={"fields": fields}))

    def debug(self, msg: str, **fields) -> None:
        self._emit(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields) -> None:
        self._emit(logging.ERROR, msg, fields)

    def exception(self, msg: str, **fields) -> None:
        self._emit(logging.ERROR, msg, fields, exc_info=sys.exc_info())


def get(name: str) -> EventLogger:
    return EventLogger(name)


class Throttle:
    """Lines a remote peer can cause, limited per kind: a burst, then one per ``every`` seconds.

    For anything a scanner, a broken client or an attacker can trigger at will (bad HTTP, TLS
    garbage, bad handshakes, protocol errors, rejected keys, even connects): the first lines
    show what is happening, the rest would only flood the journal. The next line that gets
    through says how many were left out. Kinds are a bounded set chosen by the caller (by
    default the message), never peer-controlled text such as a key or an address, so fresh
    keys or addresses cannot defeat it. Each server owns one, so its count is its own metric.
    """

    __slots__ = ("total", "_buckets", "_suppressed")

    def __init__(self) -> None:
        self.total = 0  # lines left out so far (a metric)
        self._buckets: dict[str, TokenBucket] = {}
        self._suppressed: dict[str, int] = {}

    def check(self, kind: str, now: float, *, burst: int = 1, every: float = 10.0) -> int | None:
        """None to stay quiet; else log now, noting the returned count of lines left out."""
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = TokenBucket(1.0 / every, burst, now)
        if not bucket.allow(now):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            self.total += 1
            return None
        return self._suppressed.pop(kind, 0)

    def log(self, log: EventLogger, level: str, msg: str, *, kind: str = "", burst: int = 1,
            every: float = 10.0, **fields) -> None:
        """``log.<level>(msg, ...)`` within the budget of ``kind`` (default: ``msg``)."""
        n = self.check(kind or msg, time.monotonic(), burst=burst, every=every)
        if n is not None:
            getattr(log, level)(msg, **fields, suppressed=n or None)
