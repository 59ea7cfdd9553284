"""`python -m services.decode`: a worker in the decode role (a mixed engine for now; the role is
recorded and reported). The worker code is shared in `common.worker`."""

import sys

from common.worker.main import main

if __name__ == "__main__":
    sys.exit(main("decode"))
