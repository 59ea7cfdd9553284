"""The worker process shared by `services.prefill` and `services.decode` (services never import
each other, so the code lives in common): `worker` (the Worker class), `outputs` (sending to
gateways), `main` (flags and process entry). Submodules are imported on use, so the scheduler can
use `outputs` without loading the engine."""
