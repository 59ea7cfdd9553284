"""What a worker does in the decode role: reserve pages for a sequence a prefill peer offers,
take its KV in layer by layer, and continue it in the running batch (`kv_receiver`)."""
