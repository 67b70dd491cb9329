"""``-certmode manual``: the certificate files in the certdir, followed as they change.

certbot (or any tool) renews by rewriting the files; derper picks the new pair up on SIGHUP or
by itself when the files change, with no restart and no dropped connection. A new pair that
cannot be served (half-written, expired, wrong name, key mismatch) is logged and ignored: the
previous certificate keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from .. import logs
from ..disk.filewatch import Signature, follow, signature
from .bundle import CertError, load_manual, manual_paths
from .context import ServerTLS

log = logs.get("derper.certs.bundle")


class ManualCerts:
    def __init__(self, certdir: Path, hostname: str, tls: ServerTLS, *,
                 wait_for_files: bool = False) -> None:
        """``wait_for_files``: if neither file exists yet, start without a certificate and
        install the pair once it appears (certbot's first ``--webroot`` run needs derper's HTTP
        helper)."""
        self.certdir, self.hostname, self.tls = certdir, hostname, tls
        self.paths = manual_paths(certdir, hostname)
        self.wait_for_files = wait_for_files
        self._loaded: Signature = (None, None)

    def load(self) -> None:
        """At start-up, once the files are there: serve the pair; raises CertError if unusable."""
        self._loaded = self._signature()
        if self.wait_for_files and self._loaded == (None, None):
            log.warning("no certificate yet; serving TLS once these files appear",
                        crt=self.paths[0], key=self.paths[1])
            return
        self._install("certificate loaded")

    def _install(self, message: str) -> None:
        bundle = load_manual(self.certdir, self.hostname)
        self.tls.install(bundle)
        log.info(message, subject=bundle.leaf.subject.rfc4514_string(),
                 not_after=bundle.not_after.isoformat(), crt=self.paths[0])

    def reload(self) -> bool:
        """Install the pair on disk now; on failure keep serving what we have."""
        self._loaded = self._signature()
        try:
            self._install("certificate reloaded")
        except CertError as e:
            log.error("certificate reload failed; still serving the previous certificate"
                      if self.tls.context else "certificate reload failed; no certificate yet",
                      error=str(e))
            return False
        return True

    async def watch(self, interval: float) -> None:
        await follow(self._signature, lambda: self._loaded, interval, self._changed)

    def _changed(self) -> None:
        log.info("certificate files changed on disk; reloading")
        self.reload()

    def _signature(self) -> Signature:
        return signature(*self.paths)
