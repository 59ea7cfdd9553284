"""`python -m xllm ...`: the same as the `xllm` command."""

import sys

from xllm.cli import main

sys.exit(main())
