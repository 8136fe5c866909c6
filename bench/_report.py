"""The one way every benchmark ends: figures to an optional JSON file, and as the last printed line."""

from __future__ import annotations

import json
from pathlib import Path


def emit(figures: dict, json_path: Path | None) -> int:
    if json_path:
        json_path.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 0
