"""`python -m services.prefill`: a worker that starts in the prefill role: it prefills, streams the
first token, and hands the sequence's KV to a decode peer (`kv_sender`). The scheduler may flip it."""

from common.service_config import exit_process
from services.worker.main import main

if __name__ == "__main__":
    # Skips interpreter finalization once the worker has shut down cleanly.
    exit_process(main("prefill"))
