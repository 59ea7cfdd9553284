"""`python -m services.decode`: a worker that starts in the decode role: it reserves pages, takes
sequences' KV in from prefill peers (`kv_receiver`) and continues them in its running batch. The
scheduler may flip it."""

from common.service_config import exit_process
from services.worker.main import main

if __name__ == "__main__":
    # Skips interpreter finalization once the worker has shut down cleanly.
    exit_process(main("decode"))
