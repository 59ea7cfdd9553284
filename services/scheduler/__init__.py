"""The global scheduler service: `python -m services.scheduler`.

`registry` (instances, heartbeats, liveness), `router` (which instance serves a request),
`server` (the asyncio loop over the frontend/backend/control sockets).
"""
