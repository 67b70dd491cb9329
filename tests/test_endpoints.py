"""Plain HTTP endpoints (spec §1.7) and the port-80 helper (§1.8), as pure functions."""

from __future__ import annotations

import pytest

from derper.http import endpoints
from derper.http.endpoints import Endpoints, Request, Response

NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
BROWSER_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                               "base-uri 'self'; block-all-mixed-content; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
GO_ERROR_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}


def req(target: str = "/", method: str = "GET", **headers: str | bytes) -> Request:
    """Header names as keyword arguments, ``_`` for ``-``; lower-cased like h11 delivers them."""
    return Request(method, target, [
        (name.replace("_", "-").lower().encode(), v if isinstance(v, bytes) else v.encode())
        for name, v in headers.items()])


def headers(resp: Response) -> dict[str, str]:
    names = [k.lower() for k, _ in resp.headers]
    assert len(names) == len(set(names)), f"duplicate headers in {resp.headers}"
    return dict(resp.headers)


def server(home: str = "", derp_enabled: bool = True, body: bytes = b"{}") -> Endpoints:
    return Endpoints(home=home, derp_enabled=derp_enabled, bootstrap_body=lambda: body)


# ---- /generate_204 (Go TestNoContent) ---------------------------------------------------------

@pytest.mark.parametrize("challenge, expected", [
    (None, None),
    ("input", "response input"),
    ("ts_derp99b.tailscale.com", "response ts_derp99b.tailscale.com"),
    ("ts_192.0.2.1", "response ts_192.0.2.1"),
    ("a:b-c_d.E9", "response a:b-c_d.E9"),
    (b"foo\x00bar", None),
    ("foo bar", None),
    ("x" * 65, None),
    ("x" * 64, "response " + "x" * 64),
    ("ts_[2001:db8::1]", None),
    ("caf\u00e9".encode(), None),
    ("a/b", None),
    pytest.param("", None),
])
def test_generate_204(challenge, expected):
    extra = {} if challenge is None else {"x_tailscale_challenge": challenge}
    resp = endpoints.generate_204(req("/generate_204?t=1700000000", **extra))
    assert (resp.status, resp.body) == (204, b"")
    expected_headers = {"Cache-Control": NO_CACHE}
    if expected is not None:
        expected_headers["X-Tailscale-Response"] = expected
    assert headers(resp) == expected_headers


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_generate_204_routed_for_any_method(method):
    resp = server().handle(req("/generate_204?t=1", method, x_tailscale_challenge="ts_1.2.3.4"))
    assert resp.status == 204
    assert headers(resp)["X-Tailscale-Response"] == "response ts_1.2.3.4"


# ---- probes, robots, bootstrap DNS, /derp disabled --------------------------------------------

@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check", "/derp/probe?x=1"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_probe_ok(path, method):
    resp = server().handle(req(path, method))
    assert (resp.status, resp.body, headers(resp)) == (200, b"", {"Access-Control-Allow-Origin": "*"})


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_probe_bogus_method(method):
    resp = server().handle(req("/derp/latency-check", method))
    assert (resp.status, resp.body, headers(resp)) == (405, b"bogus probe method\n",
                                                        GO_ERROR_HEADERS)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_robots(method):
    resp = server().handle(req("/robots.txt", method))
    assert (resp.status, resp.body) == (200, b"User-agent: *\nDisallow: /\n")
    assert headers(resp) == {"Content-Type": "text/plain; charset=utf-8", **BROWSER_HEADERS}


def test_bootstrap_dns_body_from_callable_each_time():
    bodies = iter([b'{\n\t"a.example": [\n\t\t"192.0.2.1"\n\t]\n}', b""])
    ep = Endpoints(home="", derp_enabled=True, bootstrap_body=lambda: next(bodies))
    first = ep.handle(req("/bootstrap-dns?q=a.example"))
    assert (first.status, first.body, first.close) == (
        200, b'{\n\t"a.example": [\n\t\t"192.0.2.1"\n\t]\n}', True)
    assert headers(first) == {"Content-Type": "application/json", **BROWSER_HEADERS}
    second = ep.handle(req("/bootstrap-dns"))
    assert (second.status, second.body, second.close) == (200, b"", True)


def test_derp_disabled_is_404():
    resp = server(derp_enabled=False).handle(req("/derp"))
    assert (resp.status, resp.body, headers(resp)) == (404, b"derp server disabled\n",
                                                        GO_ERROR_HEADERS)


# ---- home page ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/index.html", "/derp/other", "/derp?x"])
def test_default_home_page(path):
    resp = server().handle(req(path))
    assert resp.status == 200
    assert headers(resp) == {"Content-Type": "text/html; charset=utf-8", **BROWSER_HEADERS}
    assert b"<title>DERP</title>" in resp.body
    assert b"Status: disabled" not in resp.body


def test_home_page_says_disabled():
    resp = server(derp_enabled=False).handle(req("/"))
    assert resp.status == 200 and b"Status: disabled" in resp.body


def test_blank_home():
    resp = server(home="blank").handle(req("/"))
    assert (resp.status, resp.body) == (200, b"")
    assert headers(resp) == {"Content-Type": "text/html; charset=utf-8", **BROWSER_HEADERS}


@pytest.mark.parametrize("home", ["https://example.com/derp-info", "http://example.com"])
def test_redirect_home(home):
    resp = server(home=home).handle(req("/whatever"))
    assert resp.status == 302
    assert headers(resp) == {"Location": home, **BROWSER_HEADERS}


@pytest.mark.parametrize("home", ["", "blank", "http://x", "https://x/y?z"])
def test_validate_home_accepts(home):
    assert endpoints.validate_home(home) == home


@pytest.mark.parametrize("home", ["BLANK", "example.com", "ftp://x", "/local", "https:/x",
                                  " https://x", "HTTPS://x"])
def test_invalid_home_rejected(home):
    with pytest.raises(ValueError, match="-home"):
        endpoints.validate_home(home)
    with pytest.raises(ValueError):
        server(home=home)


# ---- port-80 helper -------------------------------------------------------------------------

@pytest.mark.parametrize("hostname, port, target, location", [
    ("derp.example.com", 443, "/", "https://derp.example.com/"),
    ("derp.example.com", 8443, "/x?y=1", "https://derp.example.com:8443/x?y=1"),
    ("203.0.113.7", 443, "/derp/probe", "https://203.0.113.7/derp/probe"),
    ("2001:db8::1", 443, "/a", "https://[2001:db8::1]/a"),
    ("2001:db8::1", 8443, "/a", "https://[2001:db8::1]:8443/a"),
    ("derp.example.com", 443, "http://evil.example/x", "https://derp.example.com/"),
    pytest.param("[2001:db8::1]", 443, "/a", "https://[2001:db8::1]/a"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_https_redirect(hostname, port, target, location, method):
    resp = endpoints.https_redirect(req(target, method, host="attacker.example"), hostname, port)
    assert resp.status == 302
    assert headers(resp) == {"Location": location, "Content-Type": "text/html; charset=utf-8"}


def test_https_redirect_body_escapes_url():
    resp = endpoints.https_redirect(req("/a?b=1&c=<2>"), "derp.example.com", 443)
    assert resp.body == b'<a href="https://derp.example.com/a?b=1&amp;c=&lt;2&gt;">Found</a>.\n'


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "CONNECT"])
def test_https_redirect_refuses_other_methods(method):
    resp = endpoints.https_redirect(req("/x", method), "derp.example.com", 443)
    assert (resp.status, resp.body, headers(resp)) == (400, b"Use HTTPS\n", GO_ERROR_HEADERS)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_https_helper_answers_generate_204(method):
    resp = endpoints.https_redirect(
        req("/generate_204?t=5", method, x_tailscale_challenge="ts_203.0.113.7"),
        "derp.example.com", 8443)
    assert resp.status == 204
    assert headers(resp) == {"Cache-Control": NO_CACHE,
                             "X-Tailscale-Response": "response ts_203.0.113.7"}
