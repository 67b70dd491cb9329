#!/bin/sh
# certbot --deploy-hook for derper -certmode manual: put the renewed certificate where derper
# reads it (<certdir>/<hostname>.crt and .key, owned like the certdir so derper's user can read
# the key) and make derper load it. derper also notices changed files by itself within
# -cert-watch-interval; the reload makes it immediate.
#
#   certbot certonly --webroot -w /var/lib/derper/acme-webroot -d derp.example.com \
#     --deploy-hook /opt/derper/deploy/certbot-deploy-hook.sh
#
# Environment (certbot sets RENEWED_LINEAGE and RENEWED_DOMAINS):
#   DERPER_CERTDIR   derper's -certdir                  (default /var/lib/derper/certs)
#   DERPER_HOSTNAME  derper's -hostname                 (default: the first renewed domain)
#   DERPER_RELOAD    command that makes derper reload   (default: systemctl reload derper)
set -eu

: "${RENEWED_LINEAGE:?this script is a certbot --deploy-hook; certbot sets RENEWED_LINEAGE}"
certdir=${DERPER_CERTDIR:-/var/lib/derper/certs}
host=${DERPER_HOSTNAME:-${RENEWED_DOMAINS%% *}}
reload=${DERPER_RELOAD:-systemctl reload derper}

mkdir -p "$certdir"
owner=$(stat -c %u:%g "$certdir")

# Key first, then certificate, each published by rename: derper never reads a half-written
# file, and a pair caught between the two renames is rejected and retried, never served.
publish() {  # source, destination, mode
    install -m "$3" -o "${owner%:*}" -g "${owner#*:}" "$1" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}
publish "$RENEWED_LINEAGE/privkey.pem" "$certdir/$host.key" 0600
publish "$RENEWED_LINEAGE/fullchain.pem" "$certdir/$host.crt" 0644

if ! sh -c "$reload"; then
    echo "derper deploy hook: '$reload' failed; derper picks up $certdir/$host.crt" \
         "within -cert-watch-interval, or at its next start" >&2
    exit 1
fi
echo "derper deploy hook: installed $certdir/$host.crt and reloaded derper"
