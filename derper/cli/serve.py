"""``derper [flags]``: run the relay until a signal stops it.

The command layer around ``Server``: the key files, the errors an operator sees on stderr (with
hints for ports that cannot be bound), the collector settings for a long-lived process, and
systemd readiness once the server reports it listens.
"""

from __future__ import annotations

import errno
import gc
import sys
from functools import partial
from pathlib import Path
from typing import Mapping

import trio

from .. import __version__, logs
from ..config import Config, default_key_path
from ..disk.keyfile import load_or_create_key_file
from ..errors import ConfigError
from ..net.addr import host_literal
from ..proto.keys import KeyPair, parse_mesh_key
from ..server import Server
from ..workers.lifeline import check_supervisor
from ..workers.plan import ROLE_ENV, WorkerRole, worker_count
from ..workers.supervisor import Supervisor, WorkerReady
from . import fdlimit, gc_tuning, sdnotify
from .flags import SERVE_FLAGS, build_config, flag_defaults
from .goflags import HelpRequested, UsageError, usage

log = logs.get("derper.cli.serve")


class SystemdReady:
    """The ``task_status`` ``Server.run`` reports to: once it listens, tell systemd (READY=1)."""

    def started(self, value: object = None) -> None:
        sdnotify.notify("READY=1")


def load_server_key(config: Config) -> tuple[KeyPair, Path | None]:
    """The server key and its file (None: a throwaway -dev key)."""
    if config.dev and not config.config_path:
        log.info("using a throwaway server key (-dev without -c)")
        return KeyPair.generate(), None
    path = Path(config.config_path) if config.config_path else default_key_path()
    pair, created = load_or_create_key_file(path)
    if created:
        log.info("created a new server key file", path=path)
    return pair, path


def load_mesh_key(config: Config, environ: Mapping[str, str]) -> bytes | None:
    """The region's mesh key, if any; raises ConfigError (KeyFormatError for a malformed one)."""
    if config.mesh_psk_file:
        try:
            text = Path(config.mesh_psk_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read -mesh-psk-file {config.mesh_psk_file}: "
                              f"{e.strerror}") from e
        return parse_mesh_key(text)
    if config.dev and environ.get("TAILSCALE_DERPER_MESH_KEY"):
        return parse_mesh_key(environ["TAILSCALE_DERPER_MESH_KEY"])
    return None


def _listen_error(e: OSError, config: Config) -> str:
    hint = ""
    if e.errno == errno.EACCES:
        hint = (" (ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another port with "
                "-a / -http-port, or -http-port -1 to skip the HTTP helper)")
    elif e.errno == errno.EADDRINUSE:
        hint = " (another program already listens there)"
    elif e.errno == errno.EADDRNOTAVAIL:
        hint = " (that IP is not an address of this machine)"
    alt = f" and -stun-alt-port {config.stun_alt_port}" if config.stun_alt_port >= 0 else ""
    stun = f", -stun-port {config.stun_port}{alt} (UDP)" if config.stun else ""
    return (f"cannot listen: {e.strerror}{hint}; -a is {config.addr}, "
            f"-http-port {config.http_port}{stun}")


def run(argv: list[str], environ: Mapping[str, str], usage_head: str) -> int:
    """Serve until SIGTERM/SIGINT; the exit code. ``usage_head`` opens ``derper -h``."""
    try:
        config, _, show_version = build_config(argv, environ)
    except HelpRequested:
        print(usage_head + usage(SERVE_FLAGS, flag_defaults()))
        return 0
    except UsageError as e:
        print(f"derper: {e}\nRun 'derper -h' for the list of flags.", file=sys.stderr)
        return 2
    if show_version:
        print(f"derper {__version__}")
        return 0
    role = None
    try:
        if ROLE_ENV in environ:
            role = WorkerRole.from_env(environ[ROLE_ENV])
            check_supervisor(role)
        count = role.count if role else worker_count(config.workers)
    except ConfigError as e:
        print(f"derper: {e}", file=sys.stderr)
        return 1
    logs.setup(config.log_level, **({"worker": role.index} if role else {}))
    open_files = fdlimit.raise_soft_limit()
    if config.max_clients == 0:
        # Each process has an open-file limit of its own: with -workers, the host has N.
        config.max_clients = fdlimit.connection_cap(open_files, config.max_handshakes) * count
        if role is None:
            log.info("DERP connections capped by the open-file limit", open_files=open_files,
                     max_clients=config.max_clients)
    try:
        if role is not None:
            keypair, key_path = load_or_create_key_file(Path(role.key_path))[0], None
        else:
            keypair, key_path = load_server_key(config)
        server = Server(config, keypair, mesh_key=load_mesh_key(config, environ), role=role)
        if role is None and count > 1:
            server.prepare()  # once for the host: certificates, the printed pin, ACME account
    except ConfigError as e:
        print(f"derper: {e}", file=sys.stderr)
        return 1
    if role is None and count > 1:
        return _supervise(Supervisor(server, count, argv, environ, key_path), config)
    # Everything made so far (modules, configuration) lives as long as the process: keep it out
    # of the collector's full passes, which otherwise walk it again for every few hundred
    # new connections.
    gc.collect()
    gc.freeze()
    gc_tuning.for_many_connections()
    ready = WorkerReady(role.ready_fd) if role else SystemdReady()
    if not _until_stopped(partial(server.run, handle_signals=True, task_status=ready), config):
        return 1
    log.info("stopped", addr=f"{host_literal(server.listen_host)}:{server.main_port}")
    return 0


def _supervise(supervisor: Supervisor, config: Config) -> int:
    if not _until_stopped(partial(supervisor.run, task_status=SystemdReady()), config):
        return 1
    log.info("stopped", workers=supervisor.count)
    return 0


def _until_stopped(main, config: Config) -> bool:
    """Run ``main`` under trio until a signal stops it; False (the error printed) if start-up
    failed: the certdir did not cooperate, a worker could not start, a port cannot be bound."""
    try:
        trio.run(main)
    except ConfigError as e:
        print(f"derper: {e}", file=sys.stderr)
        return False
    except OSError as e:
        print(f"derper: {_listen_error(e, config)}", file=sys.stderr)
        return False
    except KeyboardInterrupt:
        pass
    return True
