"""`fg-train` and the checkpoints already in its output directory: which one `--resume` continues, what
it says about other runs' checkpoints at start, and a resume that has nothing left to train.

The rules (README, "Resume and output directories"):

- Each checkpoint carries a run marker (`fg_run.json`, see `_checkpoint`): its lineage (a fresh run starts
  one, a resumed run carries on its checkpoint's), the run that saved it, its step, the run's max_steps and
  when it was saved. A checkpoint without one (transformers', or saved before markers) is of no lineage.
- `--resume` with no path continues the checkpoint saved last (the marker's time, else the mtime of its
  trainer_state.json), not the highest step: after training a new run into a directory, `--resume` goes on
  with that run. It says which checkpoint, of which run, at which step of how many; when another run's
  checkpoint has a higher step, it names it and the command that resumes it.
- A checkpoint at or past this run's max_steps is refused (exit 2): there is nothing left to train.
- At start, the checkpoints of other runs in the output directory are listed once: they are kept, since
  rotation (`save_total_limit`) only deletes checkpoints of this run's lineage; and those this run will
  overwrite (same `checkpoint-N` name) are named.

`Trainer.train(resume_from_checkpoint=True)` keeps transformers' rule (the highest step).
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _checkpoint as ckpt
from ._launch import ARGV_ENV
from ._utils import length_of

NO_MARKER = "no run marker (saved by transformers, or by fg-train before run markers)"


@dataclass
class CheckpointInfo:
    """One `checkpoint-N` directory of an output directory, with what its run marker says."""

    path: Path
    step: int
    marker: dict | None
    saved_at: float  # the marker's time, else trainer_state.json's mtime
    _state: dict | None = field(default=None, repr=False)

    @property
    def lineage(self) -> str | None:
        return self.marker["lineage"] if self.marker is not None else None

    @property
    def run(self) -> str | None:
        """The run that saved it: the marker's run id, else its lineage id (a run without a bus)."""
        if self.marker is None:
            return None
        return self.marker.get("run") if isinstance(self.marker.get("run"), str) else self.marker["lineage"]

    def state(self) -> dict:
        """trainer_state.json (read once; {} when it cannot be read: the Trainer reports that at resume)."""
        if self._state is None:
            try:
                data = ckpt.read_json(self.path / ckpt.TRAINER_STATE_NAME)
            except ckpt.CheckpointError:
                data = {}
            self._state = data if isinstance(data, dict) else {}
        return self._state

    @property
    def global_step(self) -> int:
        step = self.state().get("global_step")
        return step if type(step) is int and step >= 0 else self.step

    @property
    def max_steps(self) -> int | None:
        """The max_steps of the run that saved it."""
        value = (self.marker or {}).get("max_steps")
        if not (type(value) is int and value > 0):
            value = self.state().get("max_steps")
        return value if type(value) is int and value > 0 else None

    def who(self) -> str:
        return f"run {self.run}" if self.run is not None else NO_MARKER

    def at(self) -> str:
        return f"step {self.global_step}" + (f" of {self.max_steps}" if self.max_steps else "")

    def saved(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.saved_at))

    def describe(self) -> str:
        return f"{self.path} ({self.who()}, {self.at()}, saved {self.saved()})"


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    path = Path(path)
    match = ckpt._CHECKPOINT_RE.match(path.name)
    marker = ckpt.read_run_marker(path)
    saved_at = marker.get("saved_at") if marker is not None else None
    if not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool):
        try:
            saved_at = (path / ckpt.TRAINER_STATE_NAME).stat().st_mtime
        except OSError:
            saved_at = 0.0
    info = CheckpointInfo(path, int(match.group(1)) if match else -1, marker, float(saved_at))
    if not match:
        info.step = info.global_step
    return info


def scan(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """The checkpoints of `output_dir` (complete ones: with a trainer_state.json), by step."""
    return [checkpoint_info(p) for p in ckpt.sorted_checkpoints(output_dir)
            if (p / ckpt.TRAINER_STATE_NAME).is_file()]


def newest(checkpoints: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The checkpoint saved last (the higher step on a tie)."""
    return max(checkpoints, key=lambda c: (c.saved_at, c.step), default=None)


@dataclass
class ResumePlan:
    """What `fg-train` resumes (None: a fresh run), what to say about it (rank 0), or why it cannot."""

    checkpoint: CheckpointInfo | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def lineage(self) -> str | None:
        """The lineage this run carries on (None: a new one)."""
        return self.checkpoint.lineage if self.checkpoint is not None else None


def plan_resume(output_dir: str | os.PathLike, resume, argv: list[str], max_steps: int | None) -> ResumePlan:
    """`--resume` (True: the checkpoint saved last in `output_dir`; a path: that one) for a run that trains
    to `max_steps` (None: not known before the trainer is built; check later with `nothing_to_train`)."""
    if resume is None or resume is False:
        return ResumePlan()
    if resume is True:
        found = scan(output_dir)
        if not found:
            return ResumePlan(error=f"--resume: no checkpoint-* directory in {output_dir}; pass --output-dir of "
                                    "the run to resume, or --resume PATH")
        chosen = newest(found)
        notes = [f"fg-train: --resume: resuming {chosen.describe()}, the checkpoint saved last in {output_dir}"]
        higher = max((c for c in found if c.lineage != chosen.lineage and c.step > chosen.step),
                     key=lambda c: c.step, default=None)
        if higher is not None:
            notes.append(f"fg-train: note: {higher.path} ({higher.who()}, {higher.at()}) is another run's, at a "
                         f"higher step; to resume that one instead:\n  "
                         f"{resume_command(argv, output_dir, higher.path)}")
    else:
        path = Path(resume)
        if not (path / ckpt.TRAINER_STATE_NAME).is_file():
            return ResumePlan(error=f"--resume {path}: not a checkpoint directory (no {ckpt.TRAINER_STATE_NAME} "
                                    "in it); pass a checkpoint-N directory, or --resume alone for the output "
                                    "directory's latest")
        chosen = checkpoint_info(path)
        found = None
        notes = [f"fg-train: resuming {chosen.describe()}"]
    error = nothing_to_train(chosen, max_steps, found, argv, output_dir)
    return ResumePlan(chosen, notes, error)


def nothing_to_train(chosen: CheckpointInfo, max_steps: int | None, found: list[CheckpointInfo] | None,
                     argv: list[str], output_dir) -> str | None:
    """Why resuming `chosen` for a run to `max_steps` makes no sense (it is there already), else None."""
    if max_steps is None or max_steps <= 0 or chosen.global_step < max_steps:
        return None
    own = chosen.max_steps
    text = (f"--resume: {chosen.path} ({chosen.who()}) is at step {chosen.global_step}, and this run trains to "
            f"step {max_steps} (max_steps)" + (f"; the run that saved it trained to {own}" if own and own != max_steps
                                                else "")
            + f": nothing is left to train. Raise --max-steps above {chosen.global_step} to train on from it, "
              "or resume another checkpoint with --resume PATH")
    others = [c for c in (found if found is not None else scan(output_dir))
              if c.path != chosen.path and c.global_step < max_steps]
    other = newest(others)
    if other is not None:
        text += f", e.g.\n  {resume_command(argv, output_dir, other.path)}\n  ({other.describe()})"
    return text


def resume_target(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `fg-train --resume` (no path) continues in `output_dir`: the one saved last."""
    chosen = newest(scan(output_dir))
    return chosen.path if chosen is not None else None


def resume_command(argv: list[str], output_dir, checkpoint: Path | bool | None = True) -> str:
    """This command line (every option it was given), shell-quoted, with any `--resume [CHECKPOINT]` it had
    replaced: by `--resume` (checkpoint True: the one saved last), `--resume CHECKPOINT`, or nothing (None:
    start again). Under `fg-train --nproc-per-node`, the command the user typed (ARGV_ENV; each rank's own
    lacks that option)."""
    if os.environ.get(ARGV_ENV) is not None and "LOCAL_RANK" in os.environ:
        argv = shlex.split(os.environ[ARGV_ENV])
    out, i = ["fg-train"], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":
            # argparse takes the next word as the checkpoint unless it is an option (nargs="?")
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not arg.startswith("--resume="):
            out.append(arg)
        i += 1
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv):
        out += ["--output-dir", str(output_dir)]
    if checkpoint is True:
        out.append("--resume")
    elif checkpoint:
        out += ["--resume", str(checkpoint)]
    return shlex.join(out)


# -- at start: the other runs' checkpoints --------------------------------------------------------------

def planned_max_steps(trainer) -> int | None:
    """The max_steps train() will use: args.max_steps, else epochs times updates per epoch (None when the
    training set has no length)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    try:
        batches = length_of(trainer.get_train_dataloader())
    except Exception:  # noqa: BLE001 - train() reports a bad dataset itself
        return None
    if batches is None:
        return None
    return math.ceil(args.num_train_epochs * max(math.ceil(batches / args.gradient_accumulation_steps), 1))


def planned_saves(args, start_step: int, max_steps: int | None) -> set[int] | None:
    """The steps this run saves a checkpoint at (save_strategy steps, and the last step), past
    `start_step`; None when they cannot be told in advance (epoch, best, or no max_steps)."""
    strategy = str(args.save_strategy)
    if strategy == "no":
        return set()
    if max_steps is None or strategy != "steps":
        return None
    every = args.save_steps
    every = int(math.ceil(max_steps * every) if every < 1 else every)
    saves = set(range(every * (start_step // every + 1), max_steps + 1, every)) if every > 0 else set()
    return saves | ({max_steps} if max_steps > start_step else set())


def start_notes(output_dir: str | os.PathLike, plan: ResumePlan, args, max_steps: int | None) -> list[str]:
    """What fg-train says at start about checkpoints of other runs in `output_dir` (empty: none)."""
    resumed = plan.checkpoint
    lineage = plan.lineage
    others = [c for c in scan(output_dir) if (lineage is None or c.lineage != lineage)
              and (resumed is None or not _same(c.path, resumed.path))]
    lines = []
    if others:
        groups: dict[str | None, list[CheckpointInfo]] = {}
        for c in others:
            groups.setdefault(c.lineage, []).append(c)
        lines.append(f"fg-train: {output_dir} already holds checkpoints of other runs; they are kept "
                     "(save_total_limit rotates only the checkpoints of this run):")
        for group in sorted(groups.values(), key=lambda g: newest(g).saved_at):
            last = newest(group)
            names = ", ".join(c.path.name for c in group)
            lines.append(f"  {names}: {last.who()}" + (f", to step {last.max_steps}" if last.max_steps else "")
                         + f", last saved {last.saved()}")
        start = resumed.global_step if resumed is not None else 0
        saves = planned_saves(args, start, max_steps)
        if saves is None:  # save_strategy epoch or best: any step of the run may save
            hit = [c for c in others if c.step > start and (max_steps is None or c.step <= max_steps)]
            verb, why = "may replace", "if it saves at those steps"
        else:
            hit = [c for c in others if c.step in saves]
            verb, why = "will replace", "it saves checkpoints of those numbers"
        if hit:
            lines.append(f"fg-train: warning: this run {verb} " + ", ".join(f"{c.path.name} ({c.who()})" for c in hit)
                         + f" ({why}); move them aside, or pick another --output-dir, to keep them")
    if resumed is None and (Path(output_dir) / ckpt.TRAINER_STATE_NAME).is_file():
        lines.append(f"fg-train: note: the final model and {ckpt.TRAINER_STATE_NAME} in {output_dir} (an earlier "
                     "run's) are replaced when this run ends")
    return lines


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
