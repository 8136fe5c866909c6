"""`python -m sinks` is `fg-sink` (the trainer's sink handles start it this way)."""

import sys

from .cli import main

sys.exit(main())
