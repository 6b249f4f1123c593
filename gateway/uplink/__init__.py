"""Store and forward to HQ: outbox lanes read by sequence, packed into batches, sent over HTTP or an MQTT bridge."""
