"""``-certmode letsencrypt``: obtain and renew the certificate in-process and swap it in live.

Renewal starts 30 days before expiry, or when a third of a short-lived certificate's life
remains. A failed order is retried with exponential backoff while the current certificate (if
any) keeps serving; live connections never notice a swap. The account key and the certificate
are cached in the certdir (0700, keys 0600), so a restart orders nothing new.
"""

from __future__ import annotations

import datetime
import time
from functools import partial
from pathlib import Path

import josepy as jose
import trio

from .. import logs
from ..disk.files import ensure_private_dir, write_atomic, write_atomic_group
from .acme_order import (AcmeError, AcmeSettings, ChallengePublisher, load_or_create_account_key,
                         obtain)
from .bundle import CertBundle, CertError, check_bundle, load_manual, manual_paths
from .context import ServerTLS

log = logs.get("derper.acme")

RENEW_BEFORE = datetime.timedelta(days=30)
CHECK_INTERVAL = 3600.0  # re-read the clock hourly: suspend/resume and clock steps happen


def renewal_time(bundle: CertBundle) -> datetime.datetime:
    lifetime = bundle.not_after - bundle.leaf.not_valid_before_utc
    return bundle.not_after - min(RENEW_BEFORE, lifetime / 3)


def retry_delay(failures: int, low: float, high: float) -> float:
    return min(high, low * 2 ** min(failures - 1, 32))


def unwritable_certdir(certdir: Path, reason: str) -> CertError:
    return CertError(f"cannot write to -certdir {certdir} ({reason}); derper keeps its ACME "
                     "account key and certificates there: make it a directory derper can write, "
                     "or choose another -certdir")


class AcmeCerts:
    def __init__(self, certdir: Path, hostname: str, tls: ServerTLS,
                 publisher: ChallengePublisher, settings: AcmeSettings, *,
                 retry_min: float, retry_max: float) -> None:
        self.certdir, self.hostname, self.tls = certdir, hostname, tls
        self.publisher, self.settings = publisher, settings
        self.retry_min, self.retry_max = retry_min, retry_max
        self.crt_path, self.key_path = manual_paths(certdir, hostname)
        self.account_key: jose.JWKEC | None = None  # prepare() loads or creates it
        self.failures = 0
        self.last_error: str | None = None  # why the last order failed; None once one works
        self.last_error_at: float | None = None  # when (Unix time)
        self._retry_at = 0.0
        self._force = False
        self._wake = trio.Event()

    def prepare(self) -> None:
        """At start-up: make the certdir and the account key, then serve any cached certificate.

        Raises ConfigError when the certdir cannot hold the cache: ordering certificates that
        cannot be kept would run into the CA's rate limits after a few restarts.
        """
        try:
            ensure_private_dir(self.certdir)
            probe = self.certdir / ".derper-write-test"
            write_atomic(probe, b"", 0o600, replace=True)
            probe.unlink()
            self.account_key = load_or_create_account_key(self.certdir)
        except OSError as e:
            raise unwritable_certdir(self.certdir, e.strerror) from e
        self._load_cached()

    def _load_cached(self) -> None:
        if not self.crt_path.exists() and not self.key_path.exists():
            log.info("no cached certificate; ordering one", hostname=self.hostname,
                     directory=self.settings.directory)
            return
        try:
            bundle = load_manual(self.certdir, self.hostname)
            self.tls.install(bundle)
        except CertError as e:
            log.warning("cached certificate unusable; ordering a new one", error=str(e))
            return
        log.info("serving the cached certificate", not_after=bundle.not_after.isoformat(),
                 renew_at=renewal_time(bundle).isoformat(), self_signed=bundle.self_signed)

    def renew_now(self) -> None:
        """Order a new certificate at once, whatever the current one's age (tests, operators)."""
        self._force = True
        self._wake.set()

    def _next_attempt_in(self) -> float:
        now = time.time()
        if self.failures:
            return self._retry_at - now
        bundle = self.tls.bundle
        if bundle is None or bundle.self_signed:
            return 0.0
        return renewal_time(bundle).timestamp() - now

    def next_attempt_at(self) -> float:
        """When (Unix time) the next order is due: now if one is (or is under way)."""
        return time.time() + max(0.0, self._next_attempt_in())

    async def run(self) -> None:
        while True:
            wait = self._next_attempt_in()
            if wait > 0 and not self._force:
                with trio.move_on_after(min(wait, CHECK_INTERVAL)):
                    await self._wake.wait()
                if not self._force and self._next_attempt_in() > 0:
                    continue
            self._force = False
            self._wake = trio.Event()
            await self._attempt()

    async def _attempt(self) -> None:
        current = self.tls.bundle
        log.info("ordering a certificate", hostname=self.hostname,
                 directory=self.settings.directory,
                 replacing=current.not_after.isoformat() if current else None)
        try:
            chain, key = await trio.to_thread.run_sync(
                partial(obtain, self.settings, self.account_key, self.hostname, self.publisher),
                abandon_on_cancel=True)
            bundle = check_bundle(chain, key, self.hostname, "the certificate from the CA")
            self.tls.install(bundle)
        except (AcmeError, CertError) as e:
            self.failures += 1
            self.last_error, self.last_error_at = str(e), time.time()
            delay = retry_delay(self.failures, self.retry_min, self.retry_max)
            self._retry_at = time.time() + delay
            serving = (f"the current certificate (valid until {current.not_after.isoformat()})"
                       if current else "nothing: TLS connections are refused until this works")
            log.error("could not obtain a certificate", hostname=self.hostname, error=str(e),
                      attempt=self.failures, retry_in=f"{delay:.0f}s", serving=serving)
            return
        self.failures = 0
        self.last_error = self.last_error_at = None
        log.info("certificate installed", hostname=self.hostname,
                 not_after=bundle.not_after.isoformat(),
                 renew_at=renewal_time(bundle).isoformat())
        try:
            write_atomic_group([(self.key_path, key, 0o600), (self.crt_path, chain, 0o644)],
                               replace=True)
        except OSError as e:
            log.error("certificate obtained but not cached; a restart will order it again",
                      certdir=self.certdir, error=e.strerror)
