"""The admission and limit flags from the command line and environment, and their errors."""

from __future__ import annotations

import pytest

from derper.cli import flags as cli
from tests.process import run_derper


def test_flags_and_environment_reach_the_config():
    config, _, _ = cli.build_config(
        ["-verify-clients", "-socket", "/run/ts.sock", "-verify-client-url-fail-open=false",
         "-max-clients", "7", "-bandwidth-limit", "4mbit"],
        {"DERP_VERIFY_CLIENT_URL": "https://hs.example.com/verify", "DERP_ALLOW_KEYS": "/k",
         "DERP_RATE_CONFIG": "/r.json", "DERP_MAX_HANDSHAKES": "50",
         "DERP_BANDWIDTH_LIMIT": "1mbit"})
    assert (config.verify_clients, config.socket, config.verify_client_url_fail_open) == (
        True, "/run/ts.sock", False)
    assert (config.verify_client_url, config.allow_keys, config.rate_config) == (
        "https://hs.example.com/verify", "/k", "/r.json")
    assert (config.max_clients, config.max_handshakes, config.bandwidth_limit) == (7, 50, "4mbit")


@pytest.mark.parametrize("args,files,message", [
    (["-bandwidth-limit", "4mbps"], {}, "-bandwidth-limit: invalid rate '4mbps'"),
    (["-verify-client-url", "hs.example.com/verify"], {}, "must be an http:// or https:// URL"),
    (["-max-clients", "-1"], {}, "-max-clients and -max-handshakes must be 0"),
    (["-allow-keys", "{d}/allowed"], {"allowed": "nodekey:12\n"}, "allowed line 1"),
    (["-allow-keys", "{d}/missing"], {}, "cannot read -allow-keys"),
    (["-rate-config", "{d}/rate.json"], {"rate.json": "{"}, "rate config is not valid JSON"),
    (["-rate-config", "{d}/missing.json"], {}, "cannot read -rate-config"),
])
def test_clear_startup_errors(tmp_path, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [a.format(d=tmp_path) for a in args]
    result = run_derper(["-dev", "-a", "127.0.0.1:0", *args])
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_shows_the_new_flags():
    out = run_derper(["--help"]).stdout
    for text in ("-verify-clients", "[$DERP_VERIFY_CLIENTS]", "-socket string",
                 "-verify-client-url string", "-verify-client-url-fail-open", "(default true)",
                 "-allow-keys string", "-rate-config string", "-bandwidth-limit string",
                 "-max-clients int", "-max-handshakes int", "(default 1024)"):
        assert text in out, text
