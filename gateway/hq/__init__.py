"""`bosun hq`: the reference HQ receiver (batches from many gateways, stored exactly once; a small read API)."""
