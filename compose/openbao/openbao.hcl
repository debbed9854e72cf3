# Every node of the compose stack's OpenBao cluster (openbao-1..3) runs this file and its own
# node-N.hcl (its listener). Its node id and addresses come from the environment
# (BAO_RAFT_NODE_ID, BAO_API_ADDR, BAO_CLUSTER_ADDR: docker-compose.yml). The stack uses the
# host's network, so the nodes are 127.0.0.1:8200, :8210 and :8220 (cluster ports 8201, 8211,
# 8221). Every node knows the others (retry_join): a node that starts uninitialised joins the one
# init.sh initialised as soon as it is unsealed. TLS everywhere, one CA (make-certs.sh).
storage "raft" {
  path = "/openbao/file"
  retry_join {
    leader_api_addr     = "https://127.0.0.1:8200"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
  retry_join {
    leader_api_addr     = "https://127.0.0.1:8210"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
  retry_join {
    leader_api_addr     = "https://127.0.0.1:8220"
    leader_ca_cert_file = "/openbao/certs/ca.pem"
  }
}
disable_mlock = true
ui            = false
# Standbys pass reads on to the active node, as writes are: OpenBao 2.x otherwise answers a read
# on a standby from its own lagging copy (the previous version right after a write, or a 404
# during an election), which the service would cache.
disable_standby_reads = true
