#!/bin/sh
# The compose stack's OpenBao cluster, made ready (openbao-init runs it at each `up`; safe to
# run again): initialise openbao-1 once (one unseal key: keep init.json safe, or move to an
# auto-unseal seal), unseal every node (the others join through retry_join), wait for three
# voters, then mount KV v2 at `secret` and give the service its AppRole `secrets-service`
# (role id `secrets-service`, secret id $SECRETS_VAULT_SECRET_ID, policy secrets-service.hcl).
#   BAO_NODES   the nodes' API addresses (default: 127.0.0.1:8200, :8210, :8220)
#   BAO_CACERT  the CA of their certificates;  INIT_DIR  where init.json is kept
set -eu
nodes=${BAO_NODES:-"https://127.0.0.1:8200 https://127.0.0.1:8210 https://127.0.0.1:8220"}
state=${INIT_DIR:-/openbao/init}/init.json
here=$(dirname "$0")
first=${nodes%% *}
: "${SECRETS_VAULT_SECRET_ID:?set SECRETS_VAULT_SECRET_ID}"

field() { # field NAME < init.json: the first string value of NAME ("unseal_keys_b64" is a list)
  tr -d ' \n' | sed -n "s/.*\"$1\":\[*\"\([^\"]*\)\".*/\1/p"
}

status() { # bao status exit code: 0 unsealed, 2 sealed, 1 not answering
  BAO_ADDR=$1 bao status >/dev/null 2>&1 && return 0 || return $?
}

wait_answering() {
  i=0
  while :; do
    code=0; status "$1" || code=$?
    [ "$code" -ne 1 ] && return 0
    i=$((i + 1)); [ "$i" -gt 120 ] && { echo "$1 does not answer" >&2; exit 1; }
    sleep 1
  done
}

wait_answering "$first"
if [ ! -s "$state" ]; then
  if BAO_ADDR=$first bao status -format=json 2>/dev/null | tr -d ' \n' | grep -q '"initialized":true'; then
    echo "$first is initialised but $state is missing: cannot unseal" >&2
    exit 1
  fi
  umask 077
  BAO_ADDR=$first bao operator init -key-shares=1 -key-threshold=1 -format=json > "$state.tmp"
  mv "$state.tmp" "$state"
  echo "initialised $first; unseal key and root token in $state"
fi
key=$(field unseal_keys_b64 < "$state")
BAO_TOKEN=$(field root_token < "$state")
export BAO_TOKEN

for node in $nodes; do
  wait_answering "$node"
  i=0
  # A joining node takes the key only once it has reached the leader: retry until unsealed.
  until status "$node"; do
    BAO_ADDR=$node bao operator unseal "$key" >/dev/null 2>&1 || true
    i=$((i + 1)); [ "$i" -gt 120 ] && { echo "$node does not unseal" >&2; exit 1; }
    sleep 1
  done
  echo "$node unsealed"
done

export BAO_ADDR=$first
# Joined nodes become voters after server_stabilization_time (autopilot): until then the loss
# of the leader leaves no quorum.
bao write -f sys/storage/raft/autopilot/configuration server_stabilization_time=10s >/dev/null
count=$(echo "$nodes" | wc -w)
i=0
until [ "$(bao operator raft list-peers -format=json | tr -d ' \n' | grep -o '"voter":true' | wc -l)" -eq "$count" ]; do
  i=$((i + 1)); [ "$i" -gt 120 ] && { echo "not every node became a voter" >&2; exit 1; }
  sleep 1
done
echo "$count voters"

bao secrets list -format=json | grep -q '"secret/"' || bao secrets enable -path=secret -version=2 kv
bao auth list -format=json | grep -q '"approle/"' || bao auth enable approle
bao policy write secrets-service "$here/secrets-service.hcl" >/dev/null
bao write auth/approle/role/secrets-service token_policies=secrets-service \
  token_ttl=1h token_max_ttl=24h secret_id_num_uses=0 secret_id_ttl=0 >/dev/null
bao write auth/approle/role/secrets-service/role-id role_id=secrets-service >/dev/null
# Registering the same secret id again fails: that is the run after the first.
bao write auth/approle/role/secrets-service/custom-secret-id secret_id="$SECRETS_VAULT_SECRET_ID" \
  >/dev/null 2>&1 || true
# Done once the service can log in on every node (then the instances start).
for node in $nodes; do
  i=0
  until BAO_ADDR=$node bao write auth/approle/login role_id=secrets-service \
      secret_id="$SECRETS_VAULT_SECRET_ID" >/dev/null 2>"$state.err"; do
    i=$((i + 1))
    [ "$i" -gt 60 ] && { echo "the AppRole cannot log in on $node:" >&2; cat "$state.err" >&2; exit 1; }
    sleep 1
  done
done
rm -f "$state.err"
echo "OpenBao ready: KV v2 at secret/, AppRole secrets-service"
