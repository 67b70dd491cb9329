"""``-certmode manual``: the certificate files in the certdir, followed as they change.

certbot (or any tool) renews by rewriting the files; derper picks the new pair up on SIGHUP or
by itself when the files change, with no restart and no dropped connection. A new pair that
cannot be served (half-written, expired, wrong name, key mismatch) is logged and ignored: the
previous certificate keeps serving.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from . import logs
from .certs import CertError, load_manual, manual_paths
from .tls import ServerTLS

log = logs.get("derper.certs")

Signature = tuple[tuple[int, int, int] | None, ...]


class ManualCerts:
    def __init__(self, certdir: Path, hostname: str, tls: ServerTLS, *,
                 wait_for_files: bool = False) -> None:
        """Load the pair now; raises CertError if it is unusable.

        ``wait_for_files``: if neither file exists yet, start without a certificate and install
        the pair once it appears (certbot's first ``--webroot`` run needs derper's HTTP helper).
        """
        self.certdir, self.hostname, self.tls = certdir, hostname, tls
        self.paths = manual_paths(certdir, hostname)
        self._loaded = self._signature()
        if wait_for_files and self._loaded == (None, None):
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
        """Reload when the files changed and then stayed unchanged for one more interval,
        so a pair caught mid-rewrite is not reported as broken."""
        previous = self._loaded
        while True:
            await trio.sleep(interval)
            current = self._signature()
            if current != self._loaded and current == previous:
                log.info("certificate files changed on disk; reloading")
                self.reload()
            previous = current

    def _signature(self) -> Signature:
        """What changes when either file (or a symlink's target) is rewritten."""
        result = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                result.append(None)
            else:
                result.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(result)
