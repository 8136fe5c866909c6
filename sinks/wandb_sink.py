"""`fg-sink wandb`: a run replayed into Weights & Biases, as transformers' `WandbCallback` would have logged it.

Like `report_to="wandb"`: `wandb.init(project=$WANDB_PROJECT or "huggingface", name=args.run_name or the
run's name, config={**model config, **args})` plus `model/num_parameters`; `train/global_step` is the step
metric of every other (`define_metric("*", step_metric="train/global_step", step_sync=True)`); `on_log`
metrics are renamed as `rewrite_logs` does (`eval_*` -> `eval/*`, `test_*` -> `test/*`, the rest
`train/*`), and the single-value ones (`train_runtime`, `train_loss`, `total_flos`, ...) go to the
summary. What fg-bus adds: the per-step values (`train/step_loss`, `train/step_grad_norm`), gradient
statistics (`grad/*`), the trainer's `system` records as `system/*` (wandb's own system monitor of the
sink's process is off: `x_disable_stats`, and so is the sink host's metadata); generated samples as a
`wandb.Table` (`textgen/samples`: step, prompt, text); warning, control and alert records as
`run.alert(...)` (offline too: wandb records them in the run's file) and `fg/last_alert` in the summary;
the run's end as the exit code (completed / stopped / interrupted: 0, "finished"; failed / dead: 1,
"failed"/"crashed") and `fg/end` (the status and why) in the summary.

Each point carries the record's training time as `_timestamp` (wandb keeps a `_timestamp` given to
`log()`; `_runtime` it always computes itself) and the record's seq as its wandb step (`_step`): wandb
drops a row whose step is below the run's, so the seq is what makes a restart exactly-once. The wandb run
id is derived from the fg-bus run id (`--ranks all`: one wandb run per rank, `ID-rankN`, grouped under
the run id). A state file beside the wandb directory, `WANDB_DIR/wandb/fg-sink-ID.json`, keeps the run's
id, project, entity, name and next seq; restarted, the sink resumes the run (`resume="allow"`) and
continues after the last seq the tracker holds: offline, the largest `_step` in the run's `.wandb` files
(a resumed offline run writes a new `offline-run-TIME-ID` directory; `wandb sync` uploads them in turn into
the one run); online, the resumed run's step. One writer per run: `fg-sink-ID.lock` beside the state file.

`wandb.finish` is bounded (FINISH_TIMEOUT): past it the sink says so and goes on, the run's data safe in
its local files (`wandb sync` uploads them). Connection settings are wandb's own: WANDB_MODE,
WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, WANDB_API_KEY (never written anywhere by the sink), overridden by
`--wandb-mode`, `--wandb-project`, `--wandb-entity`, `--wandb-dir`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from fg_bus import records
from fg_bus.registry import RunInfo, write_json_atomic

from . import _wandb_file
from ._output import OutputError, OutputLock, dir_mode, file_mode, make_dirs, printable, released
from .base import Sink, expand, record_time, rewrite_logs

logger = logging.getLogger(__name__)

EXTRA_MISSING = "fg-sink wandb needs the wandb extra: pip install 'fg-bus[wandb]'"
DEFAULT_PROJECT = "huggingface"  # transformers' WandbCallback default
DEFAULT_DIR = "{output_dir}"
#: seconds `run.finish` may take (uploading, online) before the sink goes on without waiting
FINISH_TIMEOUT = 60.0
#: tries of `wandb.init` (online: the server down or slow) before the sink gives up, and the longest wait
INIT_TRIES = 5
INIT_BACKOFF_MAX = 30.0
#: transformers' WandbCallback.on_log: logged once, into the summary, not as curves
SINGLE_VALUE = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                          "total_flos"})
ALERT_EVENTS = {"warning": "WARN", "alert": "WARN", "control": "INFO"}
FAILED_STATUSES = ("failed", "dead")


def add_arguments(group) -> None:
    group.add_argument("--wandb-project", metavar="NAME",
                       help=f"the W&B project (default $WANDB_PROJECT, else {DEFAULT_PROJECT!r}, as transformers)")
    group.add_argument("--wandb-entity", metavar="NAME", help="the W&B entity, team or user (default $WANDB_ENTITY)")
    group.add_argument("--wandb-mode", choices=("online", "offline"),
                       help="online (default) or offline: written to WANDB_DIR only, uploaded later by `wandb sync` "
                            "(default $WANDB_MODE)")
    group.add_argument("--wandb-dir", metavar="DIR",
                       help="where wandb writes its run directories (DIR/wandb/...) and this sink its state "
                            "(default $WANDB_DIR, else the run's output directory); {run} and {output_dir} are "
                            "replaced")


def build(opts) -> "WandbSink":
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError(EXTRA_MISSING)
    return WandbSink(project=opts.wandb_project, entity=opts.wandb_entity, mode=opts.wandb_mode,
                     wandb_dir=opts.wandb_dir, group_readable=opts.group_readable)


def wandb_id(run_id: str, rank: int = 0) -> str:
    """A wandb run id for a fg-bus run (wandb's ids take letters, digits, - and _)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:56]
    return base if rank == 0 else f"{base}-rank{rank}"


def _numbers(metrics: dict, name) -> dict:
    return {name(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _say(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)


class _RankRun:
    """One wandb run: rank 0's figures, or (`--ranks all`) one other rank's."""

    def __init__(self, sink: "WandbSink", info: RunInfo, rank: int):
        self.sink = sink
        self.info = info
        self.rank = rank
        self.id = wandb_id(info.run_id, rank)
        self.state_path = sink.wandb_dir / "wandb" / f"fg-sink-{self.id}.json"
        self.run = None
        self.state: dict = {}
        self.next_seq = 0
        self.finished = False
        self._lock: OutputLock | None = None

    # -- opening ---------------------------------------------------------------------------------------

    def open(self) -> int | None:
        """Lock, then resume the run if the tracker has it (returns the next seq), else wait for the first
        record to start it (None)."""
        mode = file_mode(self.sink.group_readable)
        make_dirs(self.state_path.parent, dir_mode(self.sink.group_readable))
        self._lock = OutputLock(self.state_path.with_suffix(".lock"), f"the W&B run {self.id}", mode).acquire()
        try:
            if self.state_path.exists():
                try:
                    self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
                    self.state["next_seq"] = int(self.state.get("next_seq", 0))
                except (ValueError, TypeError, AttributeError) as e:
                    raise OutputError(f"{self.state_path} is not a state file fg-sink wandb wrote ({e}); move it "
                                      "away to start the W&B run anew") from None
            offline = self.sink.offline
            segments = _wandb_file.segments(self.sink.wandb_dir / "wandb", self.id) if offline else []
            if offline and not segments and not self.state.get("finished"):
                self.state = {}  # its files are gone (or were never written): the whole run again, a new run
            if not self.state and not segments:
                begin = _train_begin(self.info, self.rank)
                if begin is not None:  # start the run now: a tracker that refuses it stops the sink at once
                    self._start(begin)
                return None
            if self.state.get("finished"):
                self.finished = True
                return self.state["next_seq"]
            self._start(resume=True, segments=segments)
            return self.next_seq
        except BaseException:
            self._lock = released(self._lock)
            raise

    def _start(self, record: dict | None = None, resume: bool = False, segments: list[Path] = ()) -> None:
        """wandb.init: a new run (its config and name from the on_train_begin record, if that is the record in
        hand), or the run resumed (offline: a new segment, given the config the first one holds)."""
        import wandb

        meta = (record or {}).get("meta") if (record or {}).get("event") == "on_train_begin" else None
        meta = meta if isinstance(meta, dict) else {}
        args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
        config: dict = {}
        if resume:
            name = self.state.get("name")
            if segments:
                name = name or _wandb_file.display_name(segments[0])
                config = _wandb_file.config(segments[0])
                rows = [row for seg in segments for row in _wandb_file.history(seg)]
                self.next_seq = max((row.get("_step", -1) for row in rows), default=-1) + 1
                _wait_for_a_new_second(segments[-1])
        else:
            name = args.get("run_name") or meta.get("name") or self.info.run_id
            model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            model_config = model.get("config") if isinstance(model.get("config"), dict) else {}
            config = {**model_config, **args}
            if meta.get("num_parameters") is not None:
                config["model/num_parameters"] = meta["num_parameters"]
            config["fg_bus"] = {"run_id": self.info.run_id, "rank": self.rank,
                                **{k: meta.get(k) for k in ("host", "world_size", "output_dir", "max_steps")
                                   if meta.get(k) is not None}}
            if self.rank:
                name = f"{name}-rank{self.rank}"
        project = self.state.get("project") or self.sink.project
        entity = self.state.get("entity") or self.sink.entity
        settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                                  x_save_requirements=False, console="off", silent=True)
        kwargs = dict(project=project, entity=entity, name=name, id=self.id, config=config or None,
                      dir=str(self.sink.wandb_dir), mode=self.sink.mode, resume="allow", reinit="create_new",
                      allow_val_change=True, settings=settings)
        if self.info.world_size > 1 and self.sink.ranks != "0":
            kwargs["group"] = self.info.run_id
        self.run = _init_with_retry(wandb, kwargs, self.id)
        if resume and not segments and not self.sink.offline:
            self.next_seq = max(self.run.step, 0)  # online: the server's next step is where the run ends
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.state = {"wandb_run_id": self.id, "project": project, "entity": entity, "name": name,
                      "mode": self.sink.mode or "online", "next_seq": self.next_seq}
        self.save_state()

    # -- records ---------------------------------------------------------------------------------------

    def handle(self, record: dict) -> None:
        if record["seq"] < self.next_seq or self.finished:
            return  # the tracker has it already
        event = record["event"]
        if self.run is None:
            if event not in ("on_train_begin", "on_log", "on_step_end", "grad_stats", "system", "on_predict",
                             "textgen", records.END, *ALERT_EVENTS):
                return  # nothing to log yet (on_init_end ...): start the run with the first record that has
            self._start(record)
        row = self._row(record)
        if row is not None:
            row["train/global_step"] = record.get("global_step") or 0
            row["_timestamp"] = record_time(record)
            self.run.log(row, step=record["seq"], commit=True)
            self.next_seq = record["seq"] + 1
        if event in ("on_save", records.END):
            self.save_state()

    def _row(self, record: dict) -> dict | None:
        """The history row of one record (None: it has none), after its other effects (summary, alerts)."""
        import wandb

        event = record["event"]
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        if event == "on_log":
            for key in SINGLE_VALUE & metrics.keys():
                self.run.summary[key] = metrics[key]
            return rewrite_logs(_numbers({k: v for k, v in metrics.items() if k not in SINGLE_VALUE}, lambda k: k))
        if event == "on_step_end":
            return _numbers(metrics, lambda k: f"train/step_{k}") or None
        if event == "grad_stats":
            return _numbers(metrics, lambda k: f"grad/{k}") or None
        if event == "system":
            return _numbers(metrics, lambda k: f"system/{k}") or None
        if event == "on_predict":
            return rewrite_logs(_numbers(metrics, lambda k: k)) or None
        if event == "textgen":
            if record.get("text") is None:
                return None
            table = wandb.Table(columns=["step", "prompt", "text"],
                                data=[[record.get("global_step") or 0, str(record.get("prompt", "")),
                                       str(record.get("text", ""))]])
            return {"textgen/samples": table}
        if event in ALERT_EVENTS:
            text = _alert_text(record)
            self.run.alert(title=f"fg-bus {event}: {record.get('kind') or record.get('cmd') or ''}".strip(": "),
                           text=text, level=ALERT_EVENTS[event], wait_duration=0)
            self.run.summary["fg/last_alert"] = f"step {record.get('global_step') or 0}: {text}"
            return {}  # a row of its own (train/global_step): its seq marks it done
        if event == "experiment":
            meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
            if meta.get("description"):
                self.run.notes = str(meta["description"])
            return {}
        if event == records.END:
            status = record.get("status") if isinstance(record.get("status"), str) else "?"
            self.run.summary["fg/end"] = records.describe_end(status, record.get("reason"))
            return {}
        return None

    # -- ending ----------------------------------------------------------------------------------------

    def end(self, status: str, reason: dict | None) -> None:
        if self.finished or self.run is None:
            return
        from fg_bus.registry import END_STATUSES

        if status in END_STATUSES:
            self.run.summary["fg/end"] = records.describe_end(status, reason)
            self.finished = True
            self.finish(1 if status in FAILED_STATUSES else 0)
        else:  # the sink stopped before the run's end: started again, it resumes this run
            self.finish(0, preempting=True)

    def finish(self, exit_code: int, preempting: bool = False) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        if preempting:
            run.mark_preempting()
        segment = Path(run.dir).parent / f"run-{self.id}.wandb"
        done = threading.Event()

        def finish():
            try:
                run.finish(exit_code=exit_code)
            finally:
                done.set()

        threading.Thread(target=finish, name=f"wandb-finish-{self.id}", daemon=True).start()
        if not done.wait(FINISH_TIMEOUT):
            _say(f"fg-sink wandb: the W&B run {self.id} did not finish uploading within {FINISH_TIMEOUT:g} s; going "
                 f"on without waiting (its data is in {self.sink.wandb_dir / 'wandb'}: `wandb sync` uploads it)")
        elif self.sink.offline:
            _wait_for_exit_record(segment)
        self.save_state()

    def save_state(self) -> None:
        if not self.state:
            return
        self.state.update(next_seq=self.next_seq, finished=self.finished)
        write_json_atomic(self.state_path, self.state)
        os.chmod(self.state_path, file_mode(self.sink.group_readable))

    def close(self) -> None:
        try:
            self.finish(0, preempting=True)
        finally:
            self._lock = released(self._lock)


def _train_begin(info: RunInfo, rank: int, within: int = 100) -> dict | None:
    """The run's on_train_begin record from its journal, if it is among the first records there yet."""
    from fg_bus.journal import read_journal

    try:
        for i, record in enumerate(read_journal(info.journal_path(rank))):
            if record["event"] == "on_train_begin":
                return record
            if i >= within:
                break
    except OSError:  # no journal yet: the first records will start the run
        pass
    return None


def _alert_text(record: dict) -> str:
    if record["event"] == "control":
        return f"`{record.get('cmd')}` from {record.get('source') or '?'} applied at step {record.get('global_step')}"
    return str(record.get("message") or record.get("kind") or record["event"])


def _wait_for_a_new_second(last_segment: Path) -> None:
    """wandb names an offline run's directory by its start second: a segment started in the same second as
    the last one would share its directory. Bounded: at most a second."""
    stamp = last_segment.parent.name.split("-")[2]
    deadline = time.monotonic() + 1.5
    while time.strftime("%Y%m%d_%H%M%S") <= stamp and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_exit_record(segment: Path, timeout: float = 10.0) -> None:
    """`run.finish` returns before wandb-core has written the run's last records; offline, wait (bounded) until
    its file ends with the exit record, so the file says where the run ends when the sink is started again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in _wandb_file.records(segment)):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    logger.warning("%s: no exit record after %g s", segment, timeout)


def _init_with_retry(wandb, kwargs: dict, run_id: str):
    """wandb.init, tried again with backoff while the server is down or slow (said once); a usage error (no
    API key, a bad project) is not retried."""
    delay, said = 1.0, False
    for attempt in range(1, INIT_TRIES + 1):
        try:
            return wandb.init(**kwargs)
        except wandb.errors.UsageError as e:
            raise OutputError(f"cannot start the W&B run {run_id}: {e} (log in with `wandb login` or set "
                              "WANDB_API_KEY, or run offline: --wandb-mode offline)") from None
        except (wandb.errors.Error, OSError, TimeoutError) as e:
            if attempt == INIT_TRIES:
                raise OutputError(f"cannot start the W&B run {run_id} after {INIT_TRIES} tries: {e}; started "
                                  "again, the sink continues where the run ends") from None
            if not said:
                _say(f"fg-sink wandb: W&B is not answering ({type(e).__name__}: {e}); trying again with backoff")
                said = True
            time.sleep(delay)
            delay = min(delay * 2, INIT_BACKOFF_MAX)
    raise AssertionError("unreachable")


class WandbSink(Sink):
    """`ranks`: "0" (default) logs rank 0's figures; "all" or a list gives each other rank a run of its own."""

    kind = "wandb"

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 wandb_dir: str | None = None, ranks: str = "0", group_readable: bool = False):
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.entity = entity or os.environ.get("WANDB_ENTITY") or None
        self.mode = mode or os.environ.get("WANDB_MODE") or None
        if self.mode not in (None, "online", "offline", "dryrun"):
            raise ValueError(f"W&B mode {self.mode!r}: choose online or offline")
        self.dir_template = wandb_dir or os.environ.get("WANDB_DIR") or DEFAULT_DIR
        self.ranks = ranks
        self.group_readable = group_readable
        self.wandb_dir: Path | None = None
        self.runs: dict[int, _RankRun] = {}

    @property
    def offline(self) -> bool:
        return self.mode in ("offline", "dryrun")

    @property
    def run(self):
        """Rank 0's wandb run (None before its first record, and after the end)."""
        rank_run = self.runs.get(0)
        return rank_run.run if rank_run is not None else None

    def open_run(self, info: RunInfo) -> dict[int, int] | None:
        from .runner import ranks_to_follow

        self.close()
        self.wandb_dir = Path(expand(self.dir_template, info))
        positions = {}
        for rank in ranks_to_follow(self.ranks, info):
            rank_run = self.runs[rank] = _RankRun(self, info, rank)
            position = rank_run.open()
            if position is not None:
                positions[rank] = position
        return positions or None

    def handle(self, record: dict) -> None:
        rank_run = self.runs.get(record["rank"])
        if rank_run is not None:
            rank_run.handle(record)

    def end_run(self, status: str, reason: dict | None = None) -> None:
        for rank_run in self.runs.values():
            rank_run.end(status, reason)

    def close(self) -> None:
        runs, self.runs = self.runs, {}
        for rank_run in runs.values():
            rank_run.close()


