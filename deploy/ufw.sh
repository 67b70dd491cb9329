#!/bin/sh
# Open derper's ports with ufw, keeping SSH open first so the operator is never locked out.
#
#   sudo deploy/ufw.sh [--dry-run] [--env-file FILE] [--derp-port N] [--http-port N]
#                      [--stun-port N] [--ssh-port N]...
#
# Ports default to what derper's environment file says (DERP_ADDR, DERP_HTTP_PORT,
# DERP_STUN_PORT in /etc/derper/derper.env), else 443/tcp, 80/tcp and 3478/udp. SSH ports: every
# --ssh-port, else those sshd is configured with, plus the one this session came in on
# ($SSH_CONNECTION), else 22. Safe to run again: ufw skips rules it already has.
# --dry-run prints what ufw would change (ufw --dry-run) and changes nothing.
set -eu

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}
die() { echo "ufw.sh: $*" >&2; exit 1; }

env_file=/etc/derper/derper.env
dry_run=""
derp_port="" http_port="" stun_port="" ssh_ports=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=--dry-run ;;
        --env-file) env_file=${2:?--env-file needs a file}; shift ;;
        --derp-port) derp_port=${2:?--derp-port needs a port}; shift ;;
        --http-port) http_port=${2:?--http-port needs a port}; shift ;;
        --stun-port) stun_port=${2:?--stun-port needs a port}; shift ;;
        --ssh-port) ssh_ports="$ssh_ports ${2:?--ssh-port needs a port}"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "ufw.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done

command -v ufw >/dev/null 2>&1 || die "ufw is not installed (apt-get install ufw)"

# A value from the environment file: the last KEY=value line, quotes removed.
env_value() {
    [ -r "$env_file" ] || return 0
    sed -n "s/^[[:space:]]*$1=//p" "$env_file" | tail -n 1 | tr -d "\"'"
}

if [ -z "$derp_port" ]; then
    addr=$(env_value DERP_ADDR)
    derp_port=${addr##*:}
fi
[ -n "$http_port" ] || http_port=$(env_value DERP_HTTP_PORT)
[ -n "$stun_port" ] || stun_port=$(env_value DERP_STUN_PORT)
derp_port=${derp_port:-443} http_port=${http_port:-80} stun_port=${stun_port:-3478}

if [ -z "$ssh_ports" ]; then
    if command -v sshd >/dev/null 2>&1; then
        ssh_ports=$(sshd -T 2>/dev/null | awk '$1 == "port" {print $2}' || true)
    fi
    if [ -z "$ssh_ports" ] && [ -r /etc/ssh/sshd_config ]; then
        ssh_ports=$(awk 'tolower($1) == "port" {print $2}' /etc/ssh/sshd_config \
                    /etc/ssh/sshd_config.d/*.conf 2>/dev/null || true)
    fi
    # The port of the SSH session running this script, whatever the configuration says.
    if [ -n "${SSH_CONNECTION:-}" ]; then
        ssh_ports="$ssh_ports $(echo "$SSH_CONNECTION" | awk '{print $4}')"
    fi
    [ -n "$(echo $ssh_ports)" ] || ssh_ports=22
fi

is_port() { case "$1" in ''|*[!0-9]*) return 1 ;; esac; [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

allow() {  # PORT/PROTO COMMENT
    echo "ufw.sh: allow $1 ($2)"
    ufw $dry_run allow "$1" comment "$2"
}

# SSH first: enabling ufw below must never cut the session we run in.
for port in $(printf '%s\n' $ssh_ports | sort -un); do
    is_port "$port" || die "bad SSH port $port"
    allow "$port/tcp" "SSH"
done
is_port "$derp_port" || die "bad DERP port $derp_port"
allow "$derp_port/tcp" "derper DERP over TLS"
if [ "$http_port" != "-1" ]; then
    is_port "$http_port" || die "bad HTTP port $http_port"
    allow "$http_port/tcp" "derper HTTP (ACME, captive-portal checks)"
fi
if [ "$stun_port" != "-1" ]; then
    is_port "$stun_port" || die "bad STUN port $stun_port"
    allow "$stun_port/udp" "derper STUN"
fi

if ufw status | grep -q "^Status: active"; then
    echo "ufw.sh: ufw already active"
else
    echo "ufw.sh: enabling ufw"
    ufw $dry_run --force enable
fi
