# openbao-1's listener (openbao.hcl has what the three nodes share).
listener "tcp" {
  address         = "127.0.0.1:8200"
  cluster_address = "127.0.0.1:8201"
  tls_cert_file   = "/openbao/certs/openbao.pem"
  tls_key_file    = "/openbao/certs/openbao-key.pem"
}
