"""The worker process: one engine, its loop, request lifecycle, role state, heartbeats.

`python -m services.prefill` and `python -m services.decode` start it in that role; the role is a
policy over the same engine and flips on a control message. What a worker does in each role lives
in its role package: `services.prefill` (prefill, hand the KV to a decode peer) and
`services.decode` (reserve pages, take the KV in). Submodules are imported on use.
"""
