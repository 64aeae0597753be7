"""The wire contract (ingest.proto) and the helpers that read and write it."""
