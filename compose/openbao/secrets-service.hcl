# The service's own Vault policy: least privilege on the KV v2 mount `secret` (init.sh installs
# it for the AppRole `secrets-service`; `make stack` uses it too). Renewal and lookup of its own
# token also come with OpenBao's `default` policy; named here for roles with no_default_policy.
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["read", "list"] }
path "secret/delete/*" { capabilities = ["update"] }
path "secret/undelete/*" { capabilities = ["update"] }
path "secret/destroy/*" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
