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
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald
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
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append(f"exception={_quote(f'{type(exc).__name__}: {exc}')}")
        return " ".join(parts)


def setup(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
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
    """At most one line per key per ``interval``; the next one says how many were left out.

    For messages a scanner or a broken client can trigger at will (bad HTTP, TLS garbage, bad
    handshakes): the first one shows what is happening, the rest would only flood the journal.
    Keys are a bounded set of message kinds chosen by the caller, never peer-controlled text.
    Each server owns one, so its count (a metric) is its own.
    """

    __slots__ = ("interval", "total", "_last", "_suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.total = 0  # lines left out so far (a metric)
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def check(self, key: str, now: float) -> int | None:
        """None to stay quiet; else log now, noting the returned count of lines left out."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self.total += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def log(self, log: EventLogger, level: str, msg: str, **fields) -> None:
        """``log.<level>(msg, ...)``, at most once per interval for each ``msg``."""
        n = self.check(msg, time.monotonic())
        if n is not None:
            getattr(log, level)(msg, **fields, suppressed=n or None)
