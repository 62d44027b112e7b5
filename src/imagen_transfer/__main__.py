"""`python -m imagen_transfer <command>`: the same as the `imagen-transfer` command (for `accelerate launch -m`)."""

import sys

from .jobs.cli import main

sys.exit(main())
