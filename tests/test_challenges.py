"""The HTTP-01 responder of the port-80 helper: derper's own tokens and certbot's webroot."""

from __future__ import annotations

import pytest

from derper.certs.http01 import Http01Responder
from derper.http.endpoints import Request


def get(responder: Http01Responder, path: str, method: str = "GET"):
    return responder.handle(Request(method, path, []))


def test_own_tokens_are_answered_until_withdrawn():
    r = Http01Responder()
    r.publish("tok_en-1", "tok_en-1.thumbprint")
    resp = get(r, "/.well-known/acme-challenge/tok_en-1")
    assert (resp.status, resp.body) == (200, b"tok_en-1.thumbprint")
    assert ("Content-Type", "text/plain") in resp.headers
    r.withdraw("tok_en-1")
    assert get(r, "/.well-known/acme-challenge/tok_en-1").status == 404


def test_other_paths_are_not_ours():
    assert get(Http01Responder(), "/generate_204") is None
    assert get(Http01Responder(), "/.well-known/other") is None


def test_webroot_files_are_served(tmp_path):
    challenge_dir = tmp_path / ".well-known" / "acme-challenge"
    challenge_dir.mkdir(parents=True)
    (challenge_dir / "certbotToken").write_bytes(b"certbotToken.abc")
    (challenge_dir / "huge").write_bytes(b"x" * 5000)
    r = Http01Responder(tmp_path)
    assert get(r, "/.well-known/acme-challenge/certbotToken").body == b"certbotToken.abc"
    assert get(r, "/.well-known/acme-challenge/missing").status == 404
    assert get(r, "/.well-known/acme-challenge/huge").status == 404


@pytest.mark.parametrize("token", ["../secret", "..%2Fsecret", "a/b", "", "a.b", "a b",
                                   "x" * 257])
def test_tokens_outside_base64url_never_touch_the_disk(tmp_path, token):
    (tmp_path / "secret").write_text("no")
    (tmp_path / ".well-known" / "acme-challenge").mkdir(parents=True)
    r = Http01Responder(tmp_path / "sub")
    assert get(r, "/.well-known/acme-challenge/" + token).status == 404


def test_only_get_and_head():
    r = Http01Responder()
    r.publish("t", "t.k")
    assert get(r, "/.well-known/acme-challenge/t", "HEAD").status == 200
    assert get(r, "/.well-known/acme-challenge/t", "POST").status == 404
