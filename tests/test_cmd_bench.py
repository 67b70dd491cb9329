"""``derper bench`` against a server it did not start, and its answers to bad command lines."""

from __future__ import annotations

import json
import subprocess
import sys

import trio

from derper.cli.bench import run
from tests.process import free_port


def bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "derper", "bench", *args]


async def test_loads_any_url_verified_with_a_ca_file(start_server, ca, tmp_path):
    server = await start_server(tls=True)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    target = f"https://localhost:{server.main_port}/derp"  # the SNI the server requires
    for mode, out in (("relay", tmp_path / "relay.json"), ("conns", tmp_path / "conns.json")):
        proc = await trio.run_process(bench(mode, "-url", target, "-ca-file", str(ca_file),
                                            "-smoke", "-json", str(out)),
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(out.read_text())
        assert report["target"] == target and not report["started_server"]
        [row] = report["rows"].values()
        if mode == "relay":
            assert 0 < row["received"] <= row["sent"]
            assert row["server_cpu"] is None  # no -server-pid: no server figures
        else:
            assert row["connected"] == 20 and row["failures"] == 0
            assert row["server_rss_mb"] is None
    assert server.relay.stats.accepts >= 2 + 20


def test_unreachable_server_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/derp"
    proc = subprocess.run(bench("-url", url, "-smoke", "-json", str(tmp_path / "o.json")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("derper bench: a load process failed: dial: cannot connect to")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(bench("conns", "-url", url, "-smoke", "-json",
                                str(tmp_path / "o.json")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("derper bench: no connection succeeded: dial: cannot connect to")


def test_bad_command_lines_exit_2_with_the_reason(capsys):
    cases = [
        (["-clients", "3"], {}, "-clients must be an even number >= 2, not 3"),
        (["sideways"], {}, "unexpected argument 'sideways' (modes: relay, conns)"),
        (["conns", "-conns", "0"], {}, "-conns must be at least 1"),
        (["-url", "derp.example.com"], {}, "-url must be http(s)://host[:port]/derp"),
        ([], {"DERP_BENCH_RATE": "fast"}, "environment variable DERP_BENCH_RATE (for -rate)"),
        (["-server-pid", "999999999"], {}, "-server-pid: no process 999999999 on this machine"),
        (["-url", "https://derp.example.com/derp", "-server-nice", "5"], {},
         "-server-nice is for the started derpers; with -url none is started"),
        (["-json", "/nonexistent/out.json"], {},
         "-json: cannot write to '/nonexistent/out.json': /nonexistent is not a writable"),
    ]
    for argv, environ, message in cases:
        assert run(argv, environ) == 2
        err = capsys.readouterr().err
        assert err.startswith("derper bench: ") and message in err, err


def test_help_shows_modes_examples_and_flags(capsys):
    assert run(["-h"], {}) == 0
    text = capsys.readouterr().out
    assert text.startswith("Usage: derper bench [relay|conns] [flags]")
    assert "derper bench conns -conns 10000" in text
    assert "-cert-pin string" in text and "[$DERP_BENCH_CERT_PIN]" in text
    assert "(default 10000)" in text  # -rate
