"""The bundle on disk: its manifest (open, verify, write) and its Ed25519 signatures."""
