#!/bin/sh
# Install derper as a systemd service on Ubuntu 22.04/24.04 or Debian 12, from this checkout:
#
#   sudo deploy/install.sh --hostname HOST [options]
#
#   --hostname HOST   domain name or public IP address clients reach the relay by (required)
#   --cert MODE       letsencrypt: a certificate for a domain from Let's Encrypt (the default
#                     for a domain)
#                     self-signed: self-signed certificate for an IP, pinned in the DERP map
#                                  (default for an IP; no CA, works without an ICP filing)
#                     ip-letsencrypt: short-lived Let's Encrypt certificate for the IP address
#   --email ADDR      Let's Encrypt account e-mail (optional)
#   --port N          DERP port, TCP (default 443; e.g. 8443 where 443 needs an ICP filing)
#   --http-port N     HTTP helper port, TCP (default 80, needed by Let's Encrypt; -1: none)
#   --stun-port N     STUN port, UDP (default 3478)
#   --region-id N --region-code CODE --region-name NAME   the DERP map region (900, derper, ...)
#   --firewall MODE   ufw (default): open the ports with deploy/ufw.sh; dry-run: only show what
#                     ufw would do; none: leave the firewall alone
#   --source SRC      what pip installs (default: this checkout)
#   --prefix DIR      the virtualenv (default /opt/derper)
#
# Safe to run again (e.g. to change a setting or upgrade): it rewrites /etc/derper/derper.env
# and the unit, upgrades the venv, restarts derper, and keeps the server key and certificates
# (/var/lib/derper). At the end it prints the DERP map for Headscale and for Tailscale.
set -eu

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

here=$(cd "$(dirname "$0")" && pwd)
hostname="" cert="" email="" port=443 http_port=80 stun_port=3478
region_id=900 region_code=derper region_name="" firewall=ufw
source_spec=$(dirname "$here") prefix=/opt/derper
while [ $# -gt 0 ]; do
    case "$1" in
        --hostname|--cert|--email|--port|--http-port|--stun-port|--region-id|--region-code|\
        --region-name|--firewall|--source|--prefix)
            [ $# -ge 2 ] || die "$1 needs a value" ;;
    esac
    case "$1" in
        --hostname) hostname=$2; shift ;;
        --cert) cert=$2; shift ;;
        --email) email=$2; shift ;;
        --port) port=$2; shift ;;
        --http-port) http_port=$2; shift ;;
        --stun-port) stun_port=$2; shift ;;
        --region-id) region_id=$2; shift ;;
        --region-code) region_code=$2; shift ;;
        --region-name) region_name=$2; shift ;;
        --firewall) firewall=$2; shift ;;
        --source) source_spec=$2; shift ;;
        --prefix) prefix=$2; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done

# ---- checks: everything wrong is reported before anything changes ---------------------------
[ -n "$hostname" ] || die "--hostname is required: your domain name or public IP address"
# Values end up in an environment file read by systemd and sh: keep them plain.
for value in "$hostname" "$email" "$region_code" "$region_name" "$prefix"; do
    case "$value" in *[!A-Za-z0-9\ ._:@/+-]*) die "unsupported character in '$value'" ;; esac
done
case "$hostname" in
    *:*) is_ip=yes ;;  # IPv6
    *[!0-9.]*) is_ip=no ;;
    *) is_ip=yes ;;
esac
is_port() { case "$1" in ''|*[!0-9]*) return 1 ;; esac; [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
is_port "$port" || die "--port must be a port number, not '$port'"
[ "$http_port" = -1 ] || is_port "$http_port" || die "--http-port must be a port or -1"
[ "$stun_port" = -1 ] || is_port "$stun_port" || die "--stun-port must be a port or -1"
[ -n "$cert" ] || { [ "$is_ip" = yes ] && cert=self-signed || cert=letsencrypt; }
case "$cert" in
    letsencrypt) [ "$is_ip" = no ] || die "--cert letsencrypt needs a domain; for an IP use" \
                                          "--cert self-signed or ip-letsencrypt" ;;
    self-signed|ip-letsencrypt) [ "$is_ip" = yes ] || die "--cert $cert needs an IP --hostname" ;;
    *) die "--cert must be letsencrypt, self-signed or ip-letsencrypt, not '$cert'" ;;
esac
case "$cert" in *letsencrypt)
    [ "$http_port" = 80 ] || die "Let's Encrypt checks http://$hostname/ on port 80:" \
                                 "keep --http-port 80 (or use --cert self-signed)" ;;
esac
case "$firewall" in ufw|dry-run|none) ;; *) die "--firewall must be ufw, dry-run or none" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)"
command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] \
    || die "systemd is not running here; use the Docker image instead (see README)"

# ---- packages and the virtualenv -------------------------------------------------------------
# derper needs Python >= 3.11: Debian 12 and Ubuntu 24.04 have it; Ubuntu 22.04 gets python3.11.
python=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=python3.11
fi
packages="ca-certificates $python-venv"
[ "$firewall" = none ] || packages="$packages ufw"
missing=""
for pkg in $packages; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x "$prefix/bin/python3" ]; then
    say "creating the virtualenv $prefix"
    "$python" -m venv "$prefix"
fi
say "installing derper from $source_spec into $prefix"
"$prefix/bin/pip" install -q --disable-pip-version-check --upgrade "$source_spec"
"$prefix/bin/derper" -version

# ---- configuration ---------------------------------------------------------------------------
env_file=/etc/derper/derper.env
mkdir -p /etc/derper
new_env=$(mktemp)
{
    echo "# derper settings, written by deploy/install.sh (run it again to change them, or edit"
    echo "# and 'systemctl restart derper'). Every DERP_* variable is listed by 'derper -h'."
    echo "DERP_DOMAIN=$hostname"
    echo "DERP_ADDR=:$port"
    echo "DERP_HTTP_PORT=$http_port"
    echo "DERP_STUN_PORT=$stun_port"
    echo "DERP_CERT_DIR=/var/lib/derper/certs"
    case "$cert" in
        self-signed) echo "DERP_CERT_MODE=manual" ;;
        letsencrypt) echo "DERP_CERT_MODE=letsencrypt" ;;
        ip-letsencrypt) echo "DERP_CERT_MODE=letsencrypt"; echo "DERP_ACME_IP_CERTS=true" ;;
    esac
    [ -z "$email" ] || echo "DERP_ACME_EMAIL=$email"
    echo "# For 'derper derpmap' (the server ignores these):"
    echo "DERP_REGION_ID=$region_id"
    echo "DERP_REGION_CODE=$region_code"
    [ -z "$region_name" ] || echo "DERP_REGION_NAME=\"$region_name\""
} > "$new_env"
if cmp -s "$new_env" "$env_file"; then
    rm -f "$new_env"
    say "$env_file unchanged"
else
    [ ! -e "$env_file" ] || cp -p "$env_file" "$env_file.bak"
    chmod 0644 "$new_env"
    mv "$new_env" "$env_file"
    say "wrote $env_file"
fi

unit=/etc/systemd/system/derper.service
sed "s#^ExecStart=/opt/derper/bin/derper#ExecStart=$prefix/bin/derper#" "$here/derper.service" \
    > "$unit.tmp"
mv "$unit.tmp" "$unit"
systemctl daemon-reload
systemctl enable -q derper.service
say "starting derper"
if ! systemctl restart derper.service; then
    journalctl -u derper.service -n 20 --no-pager >&2 || true
    die "derper did not start; the log is above (journalctl -u derper)"
fi

# ---- firewall --------------------------------------------------------------------------------
case "$firewall" in
    ufw) "$here/ufw.sh" --env-file "$env_file" ;;
    dry-run) "$here/ufw.sh" --dry-run --env-file "$env_file" | grep '^ufw.sh:' ;;
    none) say "firewall left alone: open $port/tcp, $http_port/tcp and $stun_port/udp yourself" ;;
esac

# ---- the DERP map ----------------------------------------------------------------------------
derpmap() {
    (
        set -a
        . "$env_file"
        set +a
        "$prefix/bin/derper" derpmap -format "$1"
    )
}
say "derper is running. Headscale: save this as a derp.paths file (e.g. /etc/headscale/derp.yaml)"
derpmap headscale
say "Tailscale: paste this \"derpMap\" into the tailnet policy file" \
    "(admin console, Access controls)"
derpmap tailscale
say "the same map later: sudo sh -c 'set -a; . $env_file; $prefix/bin/derper derpmap'"
