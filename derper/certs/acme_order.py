"""One ACME (RFC 8555) order with certbot's ``acme`` library: account, HTTP-01, finalize.

The library blocks (it uses requests), so the certificate manager runs :func:`obtain` in a worker
thread; everything it needs arrives as arguments and nothing here touches trio.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import __version__
from ..config import LETSENCRYPT_DIRECTORY as LETSENCRYPT
from ..disk.files import write_atomic
from ..errors import ConfigError, IOFailure
from .bundle import parse_ip

LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DIRECTORY_ALIASES = {"letsencrypt": LETSENCRYPT, "staging": LETSENCRYPT_STAGING}
# Let's Encrypt issues IP-address certificates only in this profile (about 6 days).
SHORTLIVED = "shortlived"
ORDER_TIMEOUT = 180.0  # Go's limit for one issuance
NETWORK_TIMEOUT = 30  # per HTTP request to the CA
ACCOUNT_KEY_FILE = "acme-account.key"


class AcmeError(IOFailure):
    """An order failed; the message says where (network, CA, challenge) and why."""


class ChallengePublisher(Protocol):
    def publish(self, token: str, key_authorization: str) -> None: ...
    def withdraw(self, token: str) -> None: ...


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    email: str = ""
    ca_bundle: str = ""  # trust roots for the ACME server itself; "" → the system's


def resolve_directory(value: str) -> str:
    """``-acme-directory``: an alias (letsencrypt, staging) or an https:// directory URL."""
    url = DIRECTORY_ALIASES.get(value.lower(), value)
    if not re.match(r"^https://[^/\s]+", url):
        raise ValueError(f"-acme-directory must be an https:// ACME directory URL, or one of "
                         f"{', '.join(DIRECTORY_ALIASES)}; not {value!r}")
    return url


def load_account_key(certdir: Path) -> jose.JWKEC | None:
    """The ACME account key (EC P-256) in the certdir, or None if there is none yet.

    Only reads, so the configuration check can look at it too. Raises ConfigError for a file
    that is not such a key, OSError if it cannot be read.
    """
    path = certdir / ACCOUNT_KEY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a PEM private key; remove it to create a new ACME "
                          "account") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{path} must be an EC P-256 key; remove it to create a new one")
    return jose.JWKEC(key=key)


def load_or_create_account_key(certdir: Path) -> jose.JWKEC:
    """The account key, created (0600) if missing; the CA knows the account by it."""
    key = load_account_key(certdir)
    if key is not None:
        return key
    new = ec.generate_private_key(ec.SECP256R1())
    pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        write_atomic(certdir / ACCOUNT_KEY_FILE, pem, 0o600, replace=False)
    except FileExistsError:
        return load_account_key(certdir)  # another derper created it meanwhile: use theirs
    return jose.JWKEC(key=new)


def obtain(settings: AcmeSettings, account_key: jose.JWKEC, hostname: str,
           publisher: ChallengePublisher, order_timeout: float = ORDER_TIMEOUT
           ) -> tuple[bytes, bytes]:
    """Order a certificate for ``hostname`` (a DNS name or an IP address).

    Returns (PEM chain, PEM private key) with a fresh key per order. Raises AcmeError.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ip = parse_ip(hostname)
    csr_pem = crypto_util.make_csr(key_pem, ipaddrs=[ip]) if ip else \
        crypto_util.make_csr(key_pem, domains=[hostname])
    net = client.ClientNetwork(account_key, alg=jose.ES256,
                               verify_ssl=settings.ca_bundle or True,
                               user_agent=f"derper/{__version__}", timeout=NETWORK_TIMEOUT)
    try:
        directory = client.ClientV2.get_directory(settings.directory, net)
        acme = client.ClientV2(directory, net)
        _register(acme, settings.email)
        offered = getattr(directory.meta, "profiles", None) or {}
        profile = SHORTLIVED if ip is not None and SHORTLIVED in offered else None
        order = acme.new_order(csr_pem, profile=profile)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=order_timeout)
        tokens = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA remembers an earlier validation
                challb = _http01(authz)
                response, validation = challb.response_and_validation(net.key)
                token = challb.chall.encode("token")
                publisher.publish(token, validation)
                tokens.append(token)
                acme.answer_challenge(challb, response)
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for token in tokens:
                publisher.withdraw(token)
    except errors.ValidationError as e:
        raise AcmeError("the CA could not validate the HTTP-01 challenge: "
                        + "; ".join(_authz_problems(e.failed_authzrs))) from e
    except errors.TimeoutError:
        raise AcmeError(f"the order did not complete within {order_timeout:.0f} s") from None
    except messages.Error as e:
        raise AcmeError(f"the CA refused: {e.detail or e.typ}") from e
    except requests.RequestException as e:
        raise AcmeError(f"cannot reach the ACME server {settings.directory}: "
                        f"{_root_cause(e)}") from e
    except errors.Error as e:
        raise AcmeError(f"ACME protocol error: {e}") from e
    return order.fullchain_pem.encode(), key_pem


def _register(acme: client.ClientV2, email: str) -> None:
    """Create the account, or find the existing one for this key (the CA answers 200)."""
    registration = messages.NewRegistration.from_data(email=email or None,
                                                      terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as e:
        acme.net.account = messages.RegistrationResource(uri=e.location,
                                                         body=messages.Registration())


def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    raise AcmeError(f"the CA offered no HTTP-01 challenge for {authz.body.identifier.value}")


def _authz_problems(authzrs) -> list[str]:
    problems = []
    for authzr in authzrs:
        for challb in authzr.body.challenges:
            if challb.error is not None:
                problems.append(f"{authzr.body.identifier.value}: "
                                f"{challb.error.detail or challb.error.typ}")
    return problems or ["no detail given"]


def _root_cause(e: BaseException) -> str:
    while e.__context__ is not None and e.__context__ is not e:
        e = e.__context__
    return str(e) or type(e).__name__
