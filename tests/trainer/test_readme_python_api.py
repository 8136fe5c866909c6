"""The README's Python API block runs as written: extracted from README.md and run in a subprocess, in a
temporary directory, with a real bus (only `max_steps` is made smaller)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fg_bus import read_journal, registry

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_block() -> str:
    """The README's python block that builds this project's Trainer with `event_bus=`."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    found = [b for b in blocks if "event_bus=BusCallback()" in b and "Trainer(" in b]
    assert len(found) == 1, f"expected one Python API block with event_bus=BusCallback(), found {len(found)}"
    return found[0]


def test_the_readme_python_api_block_runs_as_written_and_publishes_its_run(fg_home, tmp_path):
    code, replaced = re.subn(r"\bmax_steps=\d+", "max_steps=3", python_api_block())
    assert replaced == 1, "the block should set max_steps once"
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "FG_HOME": str(fg_home)})
    assert proc.returncode == 0, proc.stderr[-4000:]

    runs = list((tmp_path / "out" / "fg-bus").glob("*/run.json"))
    assert len(runs) == 1, runs
    journal = list(read_journal(registry.load_run(runs[0].parent).journal_path()))
    assert journal[0]["event"] == "on_init_end"
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "completed"
    begin = next(r for r in journal if r["event"] == "on_train_begin")
    assert begin["meta"]["model"]["factory"] == "trainer.chargpt:CharGPT"
    assert begin["meta"]["tokenizer"]["factory"] == "trainer.data:CharTokenizer"
    steps = [r for r in journal if r["event"] == "on_step_end"]
    assert [r["global_step"] for r in steps] == [1, 2, 3]
    assert all(r["metrics"]["loss"] > 0 and r["metrics"]["grad_norm"] > 0 for r in steps), steps
    final = [r for r in journal if r["event"] == "on_log" and "train_loss" in r["metrics"]]
    assert len(final) == 1 and final[0]["global_step"] == 3
