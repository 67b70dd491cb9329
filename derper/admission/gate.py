"""Who may use the relay (spec §4.9): an allowlist file, the local tailscaled, a verify URL.

Every configured check must admit a node; a client holding the mesh key skips them all (the
session decides that before asking here). Answers from tailscaled and the URL are cached for
``CACHE_TTL`` seconds so a reconnecting node, or a scanner replaying one key, costs one lookup,
not one per connection; failures and fail-open admissions are never cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import logs
from ..disk.filewatch import follow, signature
from ..errors import ConfigError
from ..http.client import HTTPClientError, request
from ..logs import Throttle
from ..metrics.counters import Stats
from ..proto import gojson
from ..proto.keys import PUBLIC_PREFIX, KeyFormatError, parse_public, public_text

log = logs.get("derper.admission.gate")

URL_TIMEOUT = 5.0  # Go's -verify-client-url timeout
LOCALAPI_TIMEOUT = 5.0
MAX_BODY = 4096  # Go reads at most 4 KiB of the URL's answer
CACHE_TTL = 10.0  # short: a node removed from the tailnet cannot open new sessions for long
CACHE_SIZE = 4096
LOG_INTERVAL = 60.0  # "admitted without verification" (fail-open) at most once per interval
MAX_CONCURRENT = 64  # lookups in flight; more wait, up to ADMISSION_DEADLINE in all
ADMISSION_DEADLINE = 10.0
DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"
LOCALAPI_HOST = "local-tailscaled.sock"
TAILSCALE_CAP = "115"  # capability version sent to the LocalAPI, as its Go client does


# ---- the -allow-keys file ---------------------------------------------------------------------

def parse_allow_keys(text: str, source: str = "allow-keys") -> frozenset[bytes]:
    """One ``nodekey:<64 hex>`` per line; ``#`` starts a comment; blank lines are ignored."""
    keys = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(parse_public(line))
        except KeyFormatError as e:
            raise ConfigError(f"{source} line {n}: {e} (want {PUBLIC_PREFIX}<64 hex>)") \
                from e
    return frozenset(keys)


def read_allow_keys(path: str) -> frozenset[bytes]:
    """The keys of the ``-allow-keys`` file at ``path``; raises ConfigError if it is broken."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read -allow-keys {path}: "
                          f"{getattr(e, 'strerror', None) or e}") from e
    return parse_allow_keys(text, f"-allow-keys {path}")


class AllowList:
    """The keys of an ``-allow-keys`` file; a broken file on reload keeps the previous keys."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp = signature(path)
        self.keys = read_allow_keys(path)

    def reload(self, why: str) -> None:
        self.stamp = signature(self.path)
        try:
            keys = read_allow_keys(self.path)
        except ConfigError as e:
            log.error("keeping the previous allowed keys: the file is broken", error=str(e),
                      keys=len(self.keys))
            return
        if keys != self.keys:
            log.info("allowed keys reloaded", path=self.path, why=why, keys=len(keys),
                     added=len(keys - self.keys), removed=len(self.keys - keys))
        self.keys = keys

    async def watch(self, interval: float) -> None:
        await follow(lambda: signature(self.path), lambda: self.stamp, interval,
                     lambda: self.reload("file changed"))


# ---- answers from tailscaled and the verify URL -----------------------------------------------

@dataclass(frozen=True)
class Verdict:
    allow: bool
    reason: str
    cacheable: bool = True


async def whois(socket_path: str, key: bytes) -> Verdict:
    """Ask the local tailscaled whether ``key`` is a node it can see (LocalAPI over unix)."""
    url = (f"http://{LOCALAPI_HOST}/localapi/v0/whois?addr=nodekey%3A{key.hex()}")
    try:
        with trio.fail_after(LOCALAPI_TIMEOUT):
            resp = await request("GET", url, unix_socket=socket_path, max_body=MAX_BODY,
                                 headers=[("Tailscale-Cap", TAILSCALE_CAP)])
    except (HTTPClientError, trio.TooSlowError) as e:
        return Verdict(False, f"tailscaled LocalAPI unreachable at {socket_path}: "
                              f"{str(e) or 'timed out'}", cacheable=False)
    if resp.status == 200:
        return Verdict(True, "known to local tailscaled")
    if resp.status == 404:
        return Verdict(False, "not found in local tailscaled")
    if resp.status == 403:
        return Verdict(False, "tailscaled LocalAPI denied whois (403): the derper user may not "
                              "read it", cacheable=False)
    return Verdict(False, f"tailscaled LocalAPI answered {resp.status}", cacheable=False)


async def verify_url(url: str, key: bytes, source: str | None, fail_open: bool) -> Verdict:
    """POST the DERPAdmitClientRequest; admit on 200 + ``{"Allow": true}``."""
    body = gojson.dumps({"NodePublic": public_text(key), "Source": source or ""})
    try:
        with trio.fail_after(URL_TIMEOUT):
            resp = await request("POST", url, body=body, max_body=MAX_BODY)
    except (HTTPClientError, trio.TooSlowError) as e:
        why = f"verify URL unreachable: {str(e) or f'timed out after {URL_TIMEOUT:g}s'}"
        if fail_open:
            return Verdict(True, why + " (admitted: -verify-client-url-fail-open)", False)
        return Verdict(False, why, cacheable=False)
    if resp.status != 200:
        return Verdict(False, f"verify URL answered {resp.status}")
    try:
        allow = gojson.load_object(resp.body).get("allow") is True
    except ValueError as e:
        return Verdict(False, f"verify URL answer is {e}")
    return Verdict(allow, "verify URL allowed" if allow else "verify URL denied")


# ---- the decision -----------------------------------------------------------------------------

_OVERLOADED = Verdict(False, f"no answer within {ADMISSION_DEADLINE:g}s (too many lookups "
                             "waiting)", cacheable=False)


class _Flight:
    """One lookup in progress; connections with the same key wait for its verdict."""

    __slots__ = ("done", "verdict")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.verdict = Verdict(False, "lookup cancelled", cacheable=False)


class Admission:
    """Runs the configured checks for one ClientInfo; never raises, never blocks the loop."""

    def __init__(self, stats: Stats, log_throttle: Throttle, *,
                 allow_list: AllowList | None = None, localapi_socket: str | None = None,
                 url: str | None = None, fail_open: bool = True) -> None:
        self.stats = stats
        self.log_throttle = log_throttle
        self.allow_list = allow_list
        self.localapi_socket = localapi_socket
        self.url = url
        self.fail_open = fail_open
        self._cache: OrderedDict[tuple, tuple[float, Verdict]] = OrderedDict()
        self._inflight: dict[tuple, _Flight] = {}
        self._limit = trio.CapacityLimiter(MAX_CONCURRENT)

    async def admit(self, key: bytes, source: str | None) -> bool:
        verdict = _OVERLOADED
        with trio.move_on_after(ADMISSION_DEADLINE):
            verdict = await self._decide(key, source)
        stats = self.stats
        if verdict.allow:
            stats.admission_allowed += 1
            if not verdict.cacheable:
                stats.admission_fail_open += 1
                self.log_throttle.log(log, "warning", "admitted without verification",
                                      every=LOG_INTERVAL, key=public_text(key),
                                      reason=verdict.reason)
        else:
            stats.admission_rejected += 1
            # Per kind, not per key: fresh random keys must not buy a line each.
            self.log_throttle.log(log, "info", "client rejected", burst=5,
                                  key=public_text(key), remote=source, reason=verdict.reason)
        return verdict.allow

    async def _decide(self, key: bytes, source: str | None) -> Verdict:
        if self.allow_list is not None and key not in self.allow_list.keys:
            return Verdict(False, "not in -allow-keys")
        if self.localapi_socket is None and self.url is None:
            return Verdict(True, "in -allow-keys")
        ck = (key, source)
        hit = self._cache.get(ck)
        if hit is not None and hit[0] > trio.current_time():
            self.stats.admission_cache_hits += 1
            return hit[1]
        flight = self._inflight.get(ck)
        if flight is not None:  # concurrent connections with one key share one lookup
            await flight.done.wait()
            return flight.verdict
        flight = self._inflight[ck] = _Flight()
        try:
            async with self._limit:
                flight.verdict = await self._lookup(key, source)
        finally:
            del self._inflight[ck]
            flight.done.set()
        if flight.verdict.cacheable:
            self._remember(ck, flight.verdict)
        return flight.verdict

    async def _lookup(self, key: bytes, source: str | None) -> Verdict:
        verdict = Verdict(True, "")
        if self.localapi_socket is not None:
            verdict = await whois(self.localapi_socket, key)
            if not verdict.allow:
                return verdict
        if self.url is not None:
            url_verdict = await verify_url(self.url, key, source, self.fail_open)
            if not (url_verdict.cacheable and verdict.cacheable):
                return Verdict(url_verdict.allow, url_verdict.reason, cacheable=False)
            verdict = url_verdict
        return verdict

    def _remember(self, ck: tuple, verdict: Verdict) -> None:
        cache = self._cache
        cache[ck] = (trio.current_time() + CACHE_TTL, verdict)
        cache.move_to_end(ck)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
