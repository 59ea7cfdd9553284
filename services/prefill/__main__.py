"""`python -m services.prefill`: a worker in the prefill role (a mixed engine for now; the role is
recorded and reported). The worker code is shared in `common.worker`."""

from common.service_config import exit_process
from common.worker.main import main

if __name__ == "__main__":
    # Skips interpreter finalization once the worker has shut down cleanly.
    exit_process(main("prefill"))
