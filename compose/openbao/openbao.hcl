# One node of the compose stack's OpenBao cluster (openbao-1..3). Its node id and addresses come
# from the environment (BAO_RAFT_NODE_ID, BAO_API_ADDR, BAO_CLUSTER_ADDR: docker-compose.yml).
# Every node knows the others (retry_join): a node that starts uninitialised joins the one that
# was initialised (by init.sh) as soon as it is unsealed. TLS everywhere, one CA (make-certs.sh).
storage "raft" {
  path = "/openbao/file"
  retry_join {
    leader_api_addr     = "https://openbao-1:8200"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
  retry_join {
    leader_api_addr     = "https://openbao-2:8200"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
  retry_join {
    leader_api_addr     = "https://openbao-3:8200"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
}
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/openbao/certs/openbao.pem"
  tls_key_file    = "/openbao/certs/openbao-key.pem"
}
disable_mlock = true
ui            = false
# Standbys pass reads on to the active node, as writes are: OpenBao 2.x otherwise answers a read
# on a standby from its own lagging copy (the previous version right after a write, or a 404
# during an election), which the service would cache.
disable_standby_reads = true
