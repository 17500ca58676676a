"""SPIFFE identities, the local CA, the certificate manager and TLS contexts for HBONE."""
