#!/usr/bin/env bash
# A test CA and the certificates of the local servers, made with openssl (dev-only, never for
# production): called by servers.sh before it starts MariaDB or Kafka.
#
#   bash deploy/local/certs.sh [DIR]        (default: ${OUTBOX_LOCAL_DIR:-<repo>/.local}/certs)
#
# Creates in DIR, once (idempotent: nothing is rewritten while every file is there, the server
# and client certificates verify against the CA and none expires within 30 days; otherwise
# the whole set is made again, atomically):
#   ca.pem, ca.key                   the test CA (RSA 2048, 10 years)
#   server.pem, server.key           CN=localhost, SAN DNS:localhost, IP:127.0.0.1 (MariaDB, Kafka)
#   client.pem, client.key           CN=relay, clientAuth: the mTLS listener's client
# Keys are unencrypted PKCS#8, mode 600. MariaDB reads server.pem/server.key; Kafka gets them
# inline in its server.properties (servers.sh) and the CA as its truststore.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

DIR="${1:-${OUTBOX_LOCAL_DIR:-$REPO_ROOT/.local}/certs}"
FILES=(ca.pem ca.key server.pem server.key client.pem client.key)
DAYS=3650

certs_valid() {
    local f
    for f in "${FILES[@]}"; do [ -s "$DIR/$f" ] || return 1; done
    for f in server.pem client.pem; do
        openssl verify -CAfile "$DIR/ca.pem" "$DIR/$f" >/dev/null 2>&1 || return 1
        openssl x509 -in "$DIR/$f" -noout -checkend $((30 * 86400)) >/dev/null 2>&1 || return 1
    done
}

# leaf NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA, in $tmp.
leaf() {
    local name="$1" subject="$2" extensions="$3"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/$name.key" 2>/dev/null
    openssl req -new -key "$tmp/$name.key" -subj "$subject" -out "$tmp/$name.csr"
    printf '%s\n' "$extensions" >"$tmp/$name.ext"
    openssl x509 -req -in "$tmp/$name.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
        -CAcreateserial -days "$DAYS" -sha256 -extfile "$tmp/$name.ext" -out "$tmp/$name.pem" 2>/dev/null
    rm -f "$tmp/$name.csr" "$tmp/$name.ext"
}

ensure_openssl
if certs_valid; then
    exit 0
fi

mkdir -p "$(dirname "$DIR")"
tmp="$(mktemp -d "$DIR.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
umask 077
log "certs: making a test CA and server/client certificates in $DIR"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/ca.key" 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$DAYS" \
    -subj "/O=outbox-relay dev/CN=outbox-relay test CA $(date +%Y%m%d%H%M%S)" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$tmp/ca.pem"
leaf server "/O=outbox-relay dev/CN=localhost" "basicConstraints=CA:FALSE
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client "/O=outbox-relay dev/CN=relay" "basicConstraints=CA:FALSE
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f "$tmp/ca.srl"
chmod 600 "$tmp"/*.key
chmod 644 "$tmp"/ca.pem "$tmp"/server.pem "$tmp"/client.pem
chmod 755 "$tmp"
# Replace the directory as a whole: readers never see a CA that does not match the certificates.
rm -rf "$DIR.old"
if [ -e "$DIR" ]; then mv "$DIR" "$DIR.old"; fi
mv "$tmp" "$DIR"
rm -rf "$DIR.old"
trap - EXIT
log "certs: CA $DIR/ca.pem; server and client certificates valid for $DAYS days"
