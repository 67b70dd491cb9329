"""Go ``flag`` syntax with environment fallbacks (goflags) and the derper command line (cli)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from derper.cli import flags as cli
from derper.cli.goflags import (Flag, HelpRequested, UsageError, format_duration, parse,
                                parse_duration, usage)
from derper.config import Config

FLAGS = [
    Flag("a", "addr", "string", "listen address", ("T_ADDR",)),
    Flag("n", "count", "int", "a number", ("T_N",)),
    Flag("http-port", "http_port", "int", "port", ()),
    Flag("v", "verbose", "bool", "chatty", ("T_V", "T_VERBOSE")),
    Flag("d", "delay", "duration", "wait", ("T_D",)),
    Flag("rate", "rate", "float", "per second", ()),
]


def run(*argv: str, env: dict[str, str] | None = None):
    return parse(FLAGS, list(argv), env or {})


# ---- syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["-a", "x"], ["-a=x"], ["--a", "x"], ["--a=x"]])
def test_value_forms(argv):
    assert run(*argv) == ({"addr": "x"}, {"addr"}, [])


@pytest.mark.parametrize("argv, expected", [
    (["-v"], True), (["--v"], True), (["-v=true"], True), (["-v=T"], True), (["-v=1"], True),
    (["-v=false"], False), (["-v=0"], False), (["--v=F"], False), (["-v=FALSE"], False),
])
def test_bool_forms(argv, expected):
    assert run(*argv) == ({"verbose": expected}, {"verbose"}, [])


def test_bool_does_not_consume_next_argument():
    assert run("-v", "false", "-a", "x") == ({"verbose": True}, {"verbose"}, ["false", "-a", "x"])


@pytest.mark.parametrize("argv, values, rest", [
    (["-v", "--", "-a", "x"], {"verbose": True}, ["-a", "x"]),
    (["--"], {}, []),
    (["-v", "pos", "-a", "x"], {"verbose": True}, ["pos", "-a", "x"]),
    (["-", "-v"], {}, ["-", "-v"]),
    (["-a", "--", "-v"], {"addr": "--", "verbose": True}, []),  # a value may look like anything
])
def test_parsing_stops_at_terminator_or_non_flag(argv, values, rest):
    got_values, _, got_rest = run(*argv)
    assert (got_values, got_rest) == (values, rest)


@pytest.mark.parametrize("argv, field, expected", [
    (["-http-port", "-1"], "http_port", -1),
    (["-http-port=-1"], "http_port", -1),
    (["-n", "0x10"], "count", 16),
    (["-n", "42", "-n", "7"], "count", 7),  # last one wins
])
def test_int_values(argv, field, expected):
    assert run(*argv)[0] == {field: expected}


def test_other_value_kinds():
    values, explicit, _ = run("-d", "1h30m", "-rate", "2.5", "-a=")
    assert values == {"delay": 5400.0, "rate": 2.5, "addr": ""}
    assert explicit == {"delay", "rate", "addr"}


@pytest.mark.parametrize("argv, message", [
    (["-nope"], "flag provided but not defined: -nope"),
    (["--nope=1"], "flag provided but not defined: -nope"),
    (["-v", "-x", "y"], "flag provided but not defined: -x"),
    (["-a"], "flag needs an argument: -a"),
    (["-v", "--n"], "flag needs an argument: -n"),
    (["-n", "abc"], "-n"),
    (["-v=maybe"], "-v"),
    (["-v="], "-v"),
    (["-d", "10"], "-d"),
    (["-rate", "nan"], "-rate"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError) as e:
        run(*argv)
    assert message in str(e.value)


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["--help"], ["--h"], ["-v", "-h"],
                                  ["-help=false"]])
def test_help_requested(argv):
    with pytest.raises(HelpRequested):
        run(*argv)


# ---- environment ----------------------------------------------------------------------------

def test_env_fallback_and_precedence():
    env = {"T_ADDR": "from-env", "T_N": "5", "T_VERBOSE": "true", "T_D": "2s"}
    assert run(env=env) == ({"addr": "from-env", "count": 5, "verbose": True, "delay": 2.0},
                            {"addr", "count", "verbose", "delay"}, [])
    values, explicit, _ = run("-a", "from-flag", "-v=false", env=env)
    assert (values["addr"], values["verbose"], values["count"]) == ("from-flag", False, 5)


def test_first_listed_env_var_wins():
    assert run(env={"T_V": "false", "T_VERBOSE": "true"})[0] == {"verbose": False}


def test_empty_env_is_ignored():
    assert run(env={"T_ADDR": "", "T_V": "", "T_VERBOSE": "1"}) == (
        {"verbose": True}, {"verbose"}, [])


@pytest.mark.parametrize("env, var", [({"T_N": "abc"}, "T_N"), ({"T_VERBOSE": "yes"}, "T_VERBOSE"),
                                      ({"T_D": "10"}, "T_D")])
def test_bad_env_value_names_variable(env, var):
    with pytest.raises(UsageError, match=var):
        run(env=env)


# ---- durations ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("10m", 600), ("1h30m", 5400), ("300ms", 0.3), ("1.5h", 5400), ("0", 0), ("-2s", -2),
    ("+5s", 5), ("-0", 0), ("2h45m30.5s", 9930.5), ("1us", 1e-6), ("1µs", 1e-6), ("1μs", 1e-6),
    ("7ns", 7e-9), (".5s", 0.5), ("1.s", 1), ("15s", 15), ("1m1m", 120),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("text", ["10", "", "-", "1x", "1h 30m", "s", "1e3s", "--1s", "inf",
                                  "1.2.3s", "h1", "00", "1S", "10mm", ".s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds, text", [
    (600, "10m0s"), (15, "15s"), (2, "2s"), (0, "0s"), (3600, "1h0m0s"), (5400, "1h30m0s"),
    (0.3, "300ms"), (1.5, "1.5s"), (90000, "25h0m0s"), (61, "1m1s"), (90.5, "1m30.5s"),
    pytest.param(-2, "-2s"),
])
def test_format_duration_like_go(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip(whole_seconds):
    assert parse_duration(format_duration(whole_seconds)) == whole_seconds


# ---- usage ----------------------------------------------------------------------------------

def usage_blocks() -> dict[str, str]:
    """Flag name → its two usage lines, from the real derper flag set."""
    lines = usage(cli.SERVE_FLAGS, cli.flag_defaults()).split("\n")
    assert len(lines) == 2 * len(cli.SERVE_FLAGS)
    return {head.split()[0][1:]: head + "\n" + text for head, text in zip(lines[::2], lines[1::2])}


def test_usage_lists_every_flag_with_its_env_vars():
    blocks = usage_blocks()
    assert set(blocks) == {f.name for f in cli.SERVE_FLAGS}
    for flag in cli.SERVE_FLAGS:
        for var in flag.env:
            assert "$" + var in blocks[flag.name]
        assert ("[$" in blocks[flag.name]) == bool(flag.env)


@pytest.mark.parametrize("name, fragment", [
    ("a", '(default ":443")'), ("tcp-keepalive-time", "(default 10m0s)"),
    ("tcp-user-timeout", "(default 15s)"), ("tcp-write-timeout", "(default 2s)"),
    ("stun", "(default true)"), ("stun-port", "(default 3478)"), ("http-port", "(default 80)"),
    ("stun-port", "  -stun-port int\n    \t"), ("dev", "  -dev\n    \t"),
])
def test_usage_shows_go_style_defaults(name, fragment):
    assert fragment in usage_blocks()[name]


# ---- cli.build_config -------------------------------------------------------------------------

def build(*argv: str, **env: str):
    return cli.build_config(list(argv), env)


def test_no_arguments_give_defaults():
    assert build() == (Config(), set(), False)


@pytest.mark.parametrize("argv, env, addr", [
    (["-dev"], {}, "127.0.0.1:3340"),
    (["-dev", "-a", ":9999"], {}, ":9999"),
    (["-dev"], {"DERP_ADDR": ":7777"}, ":7777"),
    ([], {"DERP_DEV": "1"}, "127.0.0.1:3340"),
    (["-a", "[::1]:443"], {}, "[::1]:443"),
])
def test_dev_address(argv, env, addr):
    config, _, _ = cli.build_config(argv, env)
    assert config.addr == addr


@pytest.mark.parametrize("argv, env, field, value", [
    ([], {"DERP_DOMAIN": "d.example"}, "hostname", "d.example"),
    ([], {"DERP_HOSTNAME": "h.example"}, "hostname", "h.example"),
    (["-hostname", "flag.example"], {"DERP_HOSTNAME": "h.example"}, "hostname", "flag.example"),
    ([], {"DERP_CERT_MODE": "manual"}, "certmode", "manual"),
    ([], {"DERP_CERTMODE": "manual"}, "certmode", "manual"),
    (["-certmode", "letsencrypt"], {"DERP_CERT_MODE": "manual"}, "certmode", "letsencrypt"),
    ([], {"DERP_STUN": "false"}, "stun", False),
    (["-stun=false"], {}, "stun", False),
    (["-derp=false"], {}, "derp", False),
    (["-tcp-keepalive-time", "5m"], {}, "tcp_keepalive_time", 300.0),
    (["-tcp-write-timeout=0"], {}, "tcp_write_timeout", 0.0),
    (["-accept-connection-limit", "10.5"], {}, "accept_connection_limit", 10.5),
    (["-log-level", "debug"], {"DERP_LOG_LEVEL": "error"}, "log_level", "debug"),
])
def test_flags_and_env_fill_config(argv, env, field, value):
    config, explicit, _ = cli.build_config(argv, env)
    assert getattr(config, field) == value
    assert field in explicit


@pytest.mark.parametrize("env_value, depth", [
    (None, 32), ("", 32), ("64", 64), ("1", 1),
    pytest.param("0", 32),
    pytest.param("-5", 32),
])
def test_queue_depth_env(env_value, depth):
    env = {} if env_value is None else {"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH": env_value}
    assert cli.build_config([], env)[0].queue_depth == depth


@pytest.mark.parametrize("argv, env, message", [
    (["-log-level", "verbose"], {}, "-log-level"),
    ([], {"DERP_LOG_LEVEL": "loud"}, "-log-level"),
    ([], {"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH": "many"},
     "TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"),
    ([], {"DERP_STUN_PORT": "x"}, "DERP_STUN_PORT"),
    (["-dev", "extra"], {}, "unexpected argument 'extra'"),
    (["-stun", "false"], {}, "unexpected argument 'false'"),
    (["-stun-port"], {}, "flag needs an argument: -stun-port"),
    (["-no-such-flag", "x"], {}, "flag provided but not defined: -no-such-flag"),
])
def test_build_config_errors(argv, env, message):
    with pytest.raises(UsageError) as e:
        cli.build_config(argv, env)
    assert message in str(e.value)


def test_help_and_version():
    with pytest.raises(HelpRequested):
        build("-dev", "-h")
    config, _, show_version = build("-version")
    assert show_version is True and config == Config()


def test_dev_command_line():
    config, explicit, show_version = build(
        "-dev", "-a", "127.0.0.1:3340", "-c", "/tmp/k.json", "-stun-port", "3478",
        "-http-port", "-1")
    assert config == Config(addr="127.0.0.1:3340", dev=True, config_path="/tmp/k.json",
                            stun_port=3478, http_port=-1)
    assert explicit == {"addr", "dev", "config_path", "stun_port", "http_port"}
    assert show_version is False
    assert config.tls is False


def test_manual_tls_command_line():
    config, explicit, _ = build(
        "-a", "127.0.0.1:8443", "-hostname", "localhost", "-certmode", "manual",
        "-certdir", "/srv/certs", "-c", "/srv/k.json", "-stun-port", "3479", "-http-port", "-1")
    assert config == Config(addr="127.0.0.1:8443", hostname="localhost", certmode="manual",
                            certdir="/srv/certs", config_path="/srv/k.json", stun_port=3479,
                            http_port=-1)
    assert explicit == {"addr", "hostname", "certmode", "certdir", "config_path", "stun_port",
                        "http_port"}
    assert config.tls is True


def test_defaults_match_go_flags():
    c = Config()
    assert (c.addr, c.hostname, c.certmode, c.http_port, c.stun, c.stun_port, c.derp) == (
        ":443", "derp.tailscale.com", "letsencrypt", 80, True, 3478, True)
    assert (c.tcp_keepalive_time, c.tcp_user_timeout, c.tcp_write_timeout) == (600, 15, 2)
    assert math.isinf(c.accept_connection_limit) and c.queue_depth == 32
