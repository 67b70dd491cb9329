"""What ``derper check`` observed, turned into one verdict per check with the fix in plain words.

Pure: the probes (``probe``) gather facts (addresses, errors, certificates, timings) and every
decision about them is made here, so each rule has a unit test and the wording lives in one
place. The names, statuses and JSON shape are a contract other tools parse (issue 16).
"""

from __future__ import annotations

import datetime
import ipaddress
import textwrap
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..net.addr import host_literal
from ..proto import metacert
from ..proto.pin import cert_pin

NAMES = ("dns", "tcp", "tls", "certificate", "fast_start", "derp", "relay", "stun",
         "captive_portal", "derp_map")
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXPIRY_WARN_DAYS = 14

_LABELS = {OK: "ok", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}
_RANK = {SKIP: 0, OK: 1, WARN: 2, FAIL: 3}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class Report:
    """Every check of one target (a TARGET, or one node of a DERP map)."""

    target: str
    checks: list[Check] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"target": self.target, "checks": [c.as_json() for c in self.checks]}

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)


def exit_status(reports: list[Report]) -> int:
    """0 when no check failed (warnings allowed), 1 when any did."""
    return 1 if any(r.failed for r in reports) else 0


def worst(statuses) -> str:
    return max(statuses, key=_RANK.__getitem__, default=OK)


def render(report: Report, width: int = 99) -> str:
    """One line per check, and under every warn or FAIL its ``fix:`` line, wrapped."""
    lines = [f"derper check {report.target}"]
    for c in report.checks:
        head = f"  {_LABELS[c.status]:<5} {c.name:<15} "
        lines.append(textwrap.fill(c.detail, width, initial_indent=head,
                                   subsequent_indent=" " * len(head)))
        if c.fix and c.status in (WARN, FAIL):
            lines.append(textwrap.fill(c.fix, width, initial_indent=" " * 8 + "fix: ",
                                       subsequent_indent=" " * 13))
    return "\n".join(lines) + "\n"


def skipped(name: str, why: str) -> Check:
    return Check(name, SKIP, why)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _with_hint(fix: str, hint: str) -> str:
    return f"{fix} {hint}" if hint else fix


# ---- dns ---------------------------------------------------------------------------------------

def dns_check(host: str, addresses: list[str], error: str, *, local: set[str] | None = None,
              public: list[str] | None = None) -> Check:
    """A/AAAA of ``host``. On the relay host (``local`` given: the addresses among them that
    belong to this machine) also whether they point here, by ``public``: this host's public
    addresses as STUN saw them."""
    if is_ip(host):
        return skipped("dns", f"{host} is an IP address: nothing to resolve")
    if error or not addresses:
        return Check("dns", FAIL, f"{host} does not resolve: {error or 'no A/AAAA records'}",
                     f"create an A record (and AAAA for IPv6) for {host} pointing at the "
                     "relay's public address, and check the name's spelling")
    found = f"{host} → {', '.join(addresses)}"
    if local is None:
        return Check("dns", OK, found)
    if local:
        return Check("dns", OK, f"{found}: {', '.join(sorted(local))} is on this host")
    if not public:
        return Check("dns", WARN, f"{found}; this host's public address is unknown (no STUN "
                                  "answer), so it cannot tell whether the name points here",
                     "start the relay with STUN on (the default) so the check can learn this "
                     "host's public address, or compare the records with `curl -s ifconfig.me`")
    if set(public) & set(addresses):
        return Check("dns", OK, f"{found}: matches this host's public address "
                                f"{', '.join(public)} (learned over STUN)")
    return Check("dns", FAIL, f"{found}, but this host's public address is "
                              f"{', '.join(public)} (learned over STUN)",
                 f"point {host}'s A/AAAA records at {', '.join(public)}, or run the check on "
                 "the machine the name points at")


def is_ip(host: str) -> bool:
    """Whether ``host`` (brackets allowed) is an IP address literal."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# ---- tcp ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """One address tried: ``seconds`` it took to answer, or ``error`` (empty when it worked)."""

    address: str
    port: int
    seconds: float = 0.0
    error: str = ""

    @property
    def where(self) -> str:
        return f"{host_literal(self.address)}:{self.port}"


def tcp_check(attempts: list[Attempt], hint: str = "") -> Check:
    if not attempts:
        return skipped("tcp", "no address to connect to")
    parts = [f"{a.where} {a.error}" if a.error else f"{a.where} accepts ({_ms(a.seconds)})"
             for a in attempts]
    good = [a for a in attempts if not a.error]
    port = attempts[0].port
    if len(good) == len(attempts):
        return Check("tcp", OK, "; ".join(parts))
    if good:
        return Check("tcp", WARN, "; ".join(parts),
                     _with_hint("clients try every address family the name has: open TCP "
                                f"{port} on the failing one, or remove its DNS record (or set "
                                "the map's IPv4/IPv6 to \"none\")", hint))
    return Check("tcp", FAIL, "; ".join(parts),
                 _with_hint(f"make sure derper runs and listens on TCP {port} (-a :{port}), "
                            f"and open TCP {port} in the firewall (ufw allow {port}/tcp) and "
                            "in the cloud provider's security group", hint))


# ---- tls ---------------------------------------------------------------------------------------

# OpenSSL's reasons for a handshake that could not start, by what they mean for the operator.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_MESSAGE", "RECORD_TOO_LARGE",
            "UNKNOWN_PROTOCOL", "BAD_PACKET_LENGTH")
_OLD_VERSION = ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE",
                "VERSION_TOO_LOW")


def tls_check(version: str | None, cipher: str | None, error: str) -> Check:
    """The handshake alone (certificates are the next check). ``error``: OpenSSL's reason,
    ``closed`` (the server hung up), or ``timeout: …``."""
    if error.startswith("timeout"):
        return Check("tls", FAIL, f"the port accepts but the TLS handshake got no answer "
                                  f"({error})",
                     "something that is not a TLS server holds the port, or a firewall lets "
                     "the connection in but drops its data: check what listens there "
                     "(ss -ltnp) and that derper serves TLS on it (not -dev)")
    if error == "closed":
        return Check("tls", FAIL, "the server closed the connection during the TLS handshake",
                     "it may not speak TLS on this port, or refuse the name asked for (SNI): "
                     "check the server's log and that its -hostname is the name checked here")
    if "UNRECOGNIZED_NAME" in error:
        return Check("tls", FAIL, f"the server refused the name asked for ({error})",
                     "derper in -certmode manual serves only its -hostname (SNI must name it): "
                     "check the relay by that name, or fix -hostname")
    if error:
        if any(r in error for r in _OLD_VERSION):
            return Check("tls", FAIL, f"no TLS version in common ({error})",
                         "Tailscale clients need TLS 1.2 or 1.3: enable them on the server "
                         "(derper always offers both)")
        if any(r in error for r in _NOT_TLS):
            return Check("tls", FAIL, f"this port does not speak TLS ({error})",
                         "a plain-HTTP relay (derper -dev) is checked with http://host:port; "
                         "for Tailscale clients serve TLS: run derper with -hostname and a "
                         "certificate mode instead of -dev, or fix the proxy in front of it")
        return Check("tls", FAIL, f"TLS handshake failed: {error}",
                     "look at the server's log for this handshake; Tailscale clients need "
                     "TLS 1.2 or 1.3 with a certificate for the name they dial")
    label = (version or "?").replace("TLSv", "TLS ")
    if version in ("TLSv1", "TLSv1.1", "SSLv3"):
        return Check("tls", FAIL, f"{label} negotiated: too old for Tailscale clients",
                     "enable TLS 1.2 and 1.3 on the server")
    return Check("tls", OK, f"{label}" + (f", {cipher}" if cipher else ""))


# ---- certificate -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """The served certificate, as far as the check needs it."""

    pin: str
    subject: str
    issuer: str
    names: tuple[str, ...]  # DNS and IP subject alternative names
    not_before: datetime.datetime
    not_after: datetime.datetime
    self_signed: bool


def leaf_of(chain: list[bytes]) -> Leaf | None:
    """The first certificate that is not a DERP meta certificate, parsed; None if there is none
    (or it does not parse)."""
    der = next((d for d in chain if metacert.parse(d) is None), None)
    if der is None:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
                str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            names = ()
        return Leaf(cert_pin(der), _common_name(cert.subject), _common_name(cert.issuer), names,
                    cert.not_valid_before_utc, cert.not_valid_after_utc,
                    cert.issuer == cert.subject)
    except ValueError:
        return None


def _common_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return str(cns[0].value)
    orgs = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(orgs[0].value) if orgs else name.rfc4514_string()


def covers(leaf: Leaf, host: str) -> bool:
    """Whether ``host`` is one of the leaf's names (one-label wildcards as TLS clients allow)."""
    host = host.strip("[]").lower().rstrip(".")
    for name in leaf.names:
        name = name.lower()
        if name == host:
            return True
        if is_ip(host) or is_ip(name):
            continue
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


# OpenSSL's X509_V_ERR_* codes the fix texts distinguish.
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = (62, 64)  # hostname, IP address
_UNTRUSTED = (2, 18, 19, 20, 21, 27)


def certificate_check(leaf: Leaf | None, host: str, now: datetime.datetime, *,
                      pin: str = "", pin_problem: str | None = None, insecure: bool = False,
                      verify_error: tuple[int, str] | None = None) -> Check:
    """Valid for ``host`` (or the map's ``pin`` matched) and how long it stays valid.

    ``verify_error``: OpenSSL's (code, message) when the chain did not verify against the
    trusted roots; ``pin_problem``: what ``proto.pin`` said about the pin.
    """
    if leaf is None:
        return Check("certificate", FAIL, "the server sent no certificate that could be read",
                     "serve a certificate chain for this name (derper -certmode)")
    about = _about(leaf)
    if insecure:
        return Check("certificate", WARN, f"not checked: the map sets InsecureForTests ({about})",
                     "InsecureForTests makes clients accept any certificate, including an "
                     "attacker's; remove it and pin the certificate (CertName \"sha256-raw:…\", "
                     "printed by `derper derpmap`) or use a trusted one")
    if pin:
        if pin_problem is None and not is_ip(host) and not covers(leaf, host):
            pin_problem = f"the pinned certificate is for {_names(leaf)}, not {host}"
        if pin_problem is not None:
            fix = ("put the served pin into the map (run `derper derpmap` on the relay, or "
                   f"CertName \"{leaf.pin}\") or point the node at the server that holds the "
                   "pinned certificate")
            if "validity" in pin_problem:
                fix = ("renew the self-signed certificate (delete it and restart derper, which "
                       "makes a new one) and update CertName in the map")
            elif "for " in pin_problem:
                fix = ("for a DNS HostName a pinned certificate must name it too: use the IP "
                       "address as HostName, or a certificate for the name")
            return Check("certificate", FAIL, f"the map's pin {pin[:24]}… does not match: "
                                              f"{pin_problem} ({about})", fix)
        return _expiry(leaf, now, f"pin {pin[:24]}… matched ({leaf.subject})")
    if verify_error is None:
        return _expiry(leaf, now, f"valid for {host}, issued by {leaf.issuer}")
    code, message = verify_error
    if code == _EXPIRED or (code == 0 and now > leaf.not_after):
        days = (now - leaf.not_after).days
        return Check("certificate", FAIL, f"expired on {leaf.not_after:%Y-%m-%d} ({days} days "
                                          f"ago; {about})",
                     "renew it: derper's default -certmode letsencrypt renews by itself (it "
                     "needs TCP 80 open); with certbot run `certbot renew`; with -certmode "
                     "manual replace the files (derper reloads them), and check the clock")
    if code == _NOT_YET_VALID:
        return Check("certificate", FAIL, f"not valid before {leaf.not_before:%Y-%m-%d %H:%M} "
                                          f"UTC ({about})",
                     "check the clocks of the relay and of this machine (timedatectl)")
    if code in _NAME_MISMATCH:
        return Check("certificate", FAIL, f"the certificate is for {_names(leaf)}, not {host}",
                     f"serve a certificate for {host} (derper -hostname {host}), or use a name "
                     "the certificate covers; a pinned self-signed certificate goes into the "
                     "map as CertName")
    if code in _UNTRUSTED or leaf.self_signed:
        kind = "self-signed" if leaf.self_signed else f"issued by {leaf.issuer}"
        return Check("certificate", FAIL, f"not trusted: {kind} ({message}; {about})",
                     "use a publicly trusted certificate (derper's default -certmode "
                     "letsencrypt), or pin this one in the DERP map: CertName "
                     f"\"{leaf.pin}\" (`derper derpmap` prints the node); to trust a private "
                     "CA here, pass -ca-file")
    return Check("certificate", FAIL, f"does not verify: {message} ({about})",
                 "serve the full chain (leaf first, then intermediates) for this name")


def _expiry(leaf: Leaf, now: datetime.datetime, found: str) -> Check:
    left = leaf.not_after - now
    days = left.days
    lifetime = leaf.not_after - leaf.not_before
    detail = f"{found}, expires {leaf.not_after:%Y-%m-%d} ({days} days)"
    # A short-lived certificate (Let's Encrypt's ~6-day IP certificates) always has less than
    # 14 days: it warns only once renewal, due at a third of its life, is late.
    short = lifetime < datetime.timedelta(days=EXPIRY_WARN_DAYS)
    if (left < lifetime / 3) if short else (days < EXPIRY_WARN_DAYS):
        return Check("certificate", WARN, detail,
                     "renewal looks stuck: derper renews Let's Encrypt certificates itself "
                     "(the log says why an order failed; TCP 80 must reach it); with certbot "
                     "check `certbot renew --dry-run`")
    return Check("certificate", OK, detail)


def _about(leaf: Leaf) -> str:
    return f"{leaf.subject}, expires {leaf.not_after:%Y-%m-%d}"


def _names(leaf: Leaf) -> str:
    return ", ".join(leaf.names) or leaf.subject or "no name"


# ---- fast_start --------------------------------------------------------------------------------

def fast_start_check(version: str | None, chain: list[bytes]) -> Check:
    meta = next(filter(None, map(metacert.parse, chain)), None)
    if meta is None:
        return Check("fast_start", WARN, "no DERP meta certificate in the chain: clients wait "
                                         "for the HTTP 101 before the DERP handshake",
                     "terminate TLS in derper itself (a proxy such as nginx or Caddy in front "
                     "replaces the chain); derper and the Go derper append the meta "
                     "certificate themselves")
    key, proto_version = meta
    if version != "TLSv1.3":
        return Check("fast_start", WARN, f"meta certificate present, but {version} hides it "
                                         "from clients (fast start needs TLS 1.3)",
                     "allow TLS 1.3 on the server")
    return Check("fast_start", OK, f"meta certificate present (server key "
                                   f"{key.hex()[:16]}…, protocol {proto_version}): clients "
                                   "skip a round trip")


# ---- derp and relay ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DerpOutcome:
    """One DERP connection attempt: the server's facts, or the client's failed ``step``."""

    seconds: float = 0.0
    server_key: bytes = b""
    version: int = 0
    fast_start: bool = False
    step: str = ""  # DerpClientError.step; empty when it worked
    error: str = ""
    refused: bool = False  # the server closed after ClientInfo: admission said no
    verified: bool = True  # whether the certificate was checked on this connection


def derp_check(o: DerpOutcome) -> Check:
    unverified = "" if o.verified else " (certificate not checked, see above)"
    if o.refused:
        return Check("derp", OK, f"DERP server answered the upgrade and the handshake's first "
                                 f"half{unverified}; it closed the connection after "
                                 "ClientInfo (admission, see relay)")
    if o.step:
        if o.step == "upgrade":
            return Check("derp", FAIL, f"not a DERP server: {o.error}",
                         "this port serves something else: point clients at derper's port "
                         "(-a), or, behind a reverse proxy, let it pass `Upgrade: DERP` to "
                         "derper (better: let derper terminate TLS); derper -derp=false "
                         "answers 404 here")
        return Check("derp", FAIL, f"DERP handshake failed at {o.step}: {o.error}",
                     "the server answered the upgrade but not the DERP handshake: check the "
                     "server's log and that derper (or the Go derper) is what answers")
    how = "fast start" if o.fast_start else "HTTP 101 upgrade"
    return Check("derp", OK, f"DERP protocol {o.version}, server key {o.server_key.hex()[:16]}…,"
                             f" {how}, handshake in {_ms(o.seconds)}{unverified}")


@dataclass(frozen=True)
class RelayOutcome:
    rtts: tuple[float, ...] = ()
    error: str = ""
    refused: bool = False


def relay_check(o: RelayOutcome) -> Check:
    if o.refused:
        return Check("relay", WARN, "refused by admission: the relay closed the connection of "
                                    "this check's throwaway node key after ClientInfo, as it "
                                    "does for any node it does not admit",
                     "nothing to fix if you meant to admit only your own nodes "
                     "(-verify-clients, -verify-client-url, -allow-keys); otherwise check "
                     "those flags and the admission URL's log")
    if o.error or not o.rtts:
        return Check("relay", FAIL, f"two clients could not exchange packets: "
                                    f"{o.error or 'nothing arrived'}",
                     "look at the server's log (drops, write timeouts, rate limits such as "
                     "-rate-config or -bandwidth-limit set too low)")
    best, typical = min(o.rtts), sorted(o.rtts)[len(o.rtts) // 2]
    return Check("relay", OK, f"two clients exchanged {len(o.rtts)} packets through the relay: "
                              f"round trip {_ms(best)} (median {_ms(typical)})")


# ---- stun --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StunAttempt:
    address: str
    port: int
    seconds: float = 0.0
    mapped: tuple[str, int] | None = None
    error: str = ""


def stun_check(attempts: list[StunAttempt], hint: str = "") -> Check:
    if not attempts:
        return skipped("stun", "no address to send a Binding request to")
    parts = []
    for a in attempts:
        where = f"{host_literal(a.address)}:{a.port}"
        if a.mapped:
            parts.append(f"{where} answered in {_ms(a.seconds)}: you are "
                         f"{host_literal(a.mapped[0])}:{a.mapped[1]}")
        else:
            parts.append(f"{where} {a.error}")
    good = [a for a in attempts if a.mapped]
    port = attempts[0].port
    fix = _with_hint(f"open UDP {port} in the firewall (ufw allow {port}/udp) and in the cloud "
                     "provider's security group, and run derper with STUN on (-stun, the "
                     f"default) on -stun-port {port}; without STUN set the map's STUNPort to "
                     "-1", hint)
    if len(good) == len(attempts):
        return Check("stun", OK, "; ".join(parts))
    if good:
        return Check("stun", WARN, "; ".join(parts), fix)
    return Check("stun", FAIL, "; ".join(parts), fix)


# ---- captive_portal ----------------------------------------------------------------------------

def captive_portal_check(where: str, status: int | None, echoed: bool, seconds: float,
                         error: str, *, required: bool, hint: str = "") -> Check:
    """``/generate_204`` on the HTTP port; ``echoed``: the challenge came back as Tailscale
    clients expect. Not ``required`` (no CanPort80, port 80 not asked for): a warning."""
    bad = FAIL if required else WARN
    why = ("Tailscale clients use it to detect captive portals (CanPort80), and Let's "
           "Encrypt's HTTP-01 validation needs port 80")
    if error:
        return Check("captive_portal", bad, f"http://{where}/generate_204: {error}",
                     _with_hint(f"{why}: open it (ufw allow {where.rsplit(':', 1)[1]}/tcp) and "
                                "keep derper's -http-port helper on, or run the check with "
                                "-http-port -1 (and CanPort80 false) if the relay has none",
                                hint))
    if status != 204:
        return Check("captive_portal", bad, f"http://{where}/generate_204 answered HTTP "
                                            f"{status}, not 204",
                     "something other than derper's HTTP helper holds this port (a web "
                     "server?); give the port to derper (-http-port) or set CanPort80 false")
    if not echoed:
        return Check("captive_portal", WARN, f"HTTP 204 on {where} in {_ms(seconds)}, but the "
                                             "X-Tailscale-Challenge was not echoed",
                     "clients take a missing X-Tailscale-Response for a captive portal: let "
                     "derper answer /generate_204 itself, not a proxy")
    return Check("captive_portal", OK, f"HTTP 204 on {where} in {_ms(seconds)}, challenge "
                                       "echoed")
