#!/bin/sh
# Make the stack's certificates in compose/certs (or $1): a CA, the OpenBao nodes' certificate
# (openbao-1..3), the NATS nodes' certificate (server and route: nats-1..3), client certificates
# for the service and for listeners (mutual TLS to NATS), and the service's HTTPS certificate
# (secrets-a..c, localhost).
# Needs only openssl. Replace the CA with your own where one exists.
set -eu
dir=${1:-$(dirname "$0")/certs}
days=${DAYS:-825}
mkdir -p "$dir"
cd "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca-key.pem
openssl req -x509 -new -key ca-key.pem -out ca.pem -days "$days" -subj "/CN=secrets-stack CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

leaf() { # name, common name, extensions
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

leaf nats nats "subjectAltName=DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth"
leaf openbao openbao "subjectAltName=DNS:openbao-1,DNS:openbao-2,DNS:openbao-3,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth"
leaf service service "extendedKeyUsage=clientAuth"
leaf listener listener "extendedKeyUsage=clientAuth"
leaf https secrets-service "subjectAltName=DNS:secrets-a,DNS:secrets-b,DNS:secrets-c,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
rm -f ca.srl
chmod 644 ca.pem openbao.pem nats.pem service.pem listener.pem https.pem  # keys stay 0600
echo "certificates in $dir"
echo "the service containers run as uid 10001 and must read service-key.pem and https-key.pem,"
echo "the OpenBao containers as uid 100 and must read openbao-key.pem:"
echo "  sudo chown 10001 $dir/service-key.pem $dir/https-key.pem"
echo "  sudo chown 100 $dir/openbao-key.pem"
