"""What a worker does in the prefill role: after prefill, hand the sequence's KV pages to a
decode peer over its `kv` socket (`kv_sender`), trying the scheduler's candidates in order."""
