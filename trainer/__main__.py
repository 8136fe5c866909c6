"""`python -m trainer` is `fg-train` (so `torchrun -m trainer ...` works too)."""

import sys

from .cli import main

sys.exit(main())
