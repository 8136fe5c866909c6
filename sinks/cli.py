"""`fg-sink KIND`: a separate process that follows a training run's records and writes something from them.

KIND is tb, json, textgen, tail, alert or null, or `module:ClassName` for your own sink class (a `sinks.Sink` subclass,
built with no arguments, or with --option key=value pairs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import string
import sys

from fg_bus import registry

from ._output import SafeFormatter, printable, umask_for
from .alert_sink import DEFAULT_LOG, FORMATS, RULES, AlertSink
from .base import NullSink, Sink
from .json_sink import DEFAULT_OUT, JsonSink
from .runner import call_end_run, run_sink
from .tail_sink import SYSTEM_EVERY, TailSink

EPILOG = """\
examples:
  fg-sink json                        every record of the newest live run to OUTPUT_DIR/logs/RUN.jsonl
  fg-sink tb --logdir runs/tb         TensorBoard files, one directory per run (tensorboard --logdir runs/tb)
  fg-sink tail                        a live view of the run: history first, then new lines as they come
  fg-sink tail --json | jq .          the records themselves
  fg-sink json --follow               stay for the runs that come after
  fg-sink my_pkg.sinks:WandbSink --option project=demo
  fg-sink alert --webhook URL         NaN loss, divergence, stalls, a dead run... to stderr and a JSON POST
  fg-sink tb --ranks all              a torchrun job: every rank's figures (RUN/rank1, ...), not rank 0's only
"""
NOTES = """\
Started before fg-train, a sink waits for the run. Restarted, it continues where its output ends.
Its files are private (0600, directories 0700) unless --group-readable; one sink writes an output at a time.
exit status: 0 the run ended and the output is complete; 2 bad arguments or an output that cannot be used;
  3 the trainer died; 4 no run started within --wait; 5 records are missing from the output; 7 another sink
  is writing this output; 8 a write failed (the command that resumes is printed); 128+N stopped by signal N
"""

#: sinks for the trackers people already use, each in its module (imported only when asked for: the
#: tracker's client is an extra): the module has `add_arguments(group)` for its options and `build(opts)`.
TRACKERS = {"mlflow": "sinks.mlflow_sink", "wandb": "sinks.wandb_sink", "trackio": "sinks.trackio_sink"}
BUILTIN = ("json", "tb", "textgen", "tail", "alert", "null", *TRACKERS)


MAX_SEQ = (1 << 63) - 1  # seqs are 63-bit: what every JSON reader and the journal's integers hold
PLACEHOLDERS = ("run", "output_dir")


def _from(text: str) -> int | str:
    if text in ("start", "now"):
        return text
    if text.isascii() and text.isdigit():
        if int(text) > MAX_SEQ:
            raise argparse.ArgumentTypeError(f"seq {text} is beyond the largest seq, {MAX_SEQ} (2**63 - 1)")
        return int(text)
    raise argparse.ArgumentTypeError(f"expected start, now or a seq number, got {text!r}")


def _seconds(text: str, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        wanted = "a number of seconds above 0" if positive else "a number of seconds, 0 or more"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, positive=True)


def _nice(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"expected 0 to 19 (how much to lower this process's priority; from "
                                         f"--nice or $FG_SINK_NICE), got {text!r}")
    return value


def _template(text: str) -> str:
    """An output path whose only placeholders are {run} and {output_dir}."""
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (write {{{{ and }}}} for a literal brace; the "
                                         f"placeholders are {known})") from None
    unknown = [field for field in fields if field not in PLACEHOLDERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown placeholder {{{unknown[0]}}}; the placeholders are "
                                         f"{known}")
    try:
        text.format(run="run", output_dir="out")
    except (ValueError, KeyError, IndexError) as e:  # a format spec such as {run:d}
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; the placeholders are {known}, with no format") from None
    return text


def _ranks(text: str) -> str:
    if text == "all" or all(part.strip().isdigit() for part in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(f"expected 0, all, or a comma list of ranks such as 0,2; got {text!r}")


def _count(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 (off) to below 1, got {text!r}")
    return value


def _rules(text: str) -> list[str]:
    rules = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rule {unknown[0]!r}; the rules are {', '.join(RULES)}")
    return rules


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _common(p: argparse.ArgumentParser) -> None:
    """The options every sink takes."""
    p.add_argument("--run", default="latest", help="latest (default: the newest live run, or the next to start), "
                                                   "a run id, or a run/output directory")
    p.add_argument("--from", dest="start", type=_from, default="start", metavar="start|now|SEQ",
                   help="start: the whole history, or where this sink's output ends (default); now: new records only")
    p.add_argument("--follow", action="store_true", help="after the run ends, stay for the next runs")
    p.add_argument("--wait", type=_seconds, metavar="S", help="give up if no run starts within S seconds")
    p.add_argument("--dead-after", type=_positive_seconds, default=5.0, metavar="S",
                   help="declare the trainer dead after S seconds without a heartbeat (default 5; above 0)")
    # A string default goes through type=, so a bad $FG_SINK_NICE is an argument error, not a traceback.
    p.add_argument("--nice", type=_nice, default=os.environ.get("FG_SINK_NICE", "10"), metavar="N",
                   help="lower this process's CPU priority by N (default 10, or $FG_SINK_NICE): on a machine shared "
                        "with training, the training step wins the CPU; 0 keeps it as started")
    p.add_argument("--group-readable", action="store_true",
                   help="make the files this sink writes readable by the group (0640, directories 0750); by "
                        "default they are private to you (0600, 0700), like the run's journal")
    p.add_argument("--ranks", type=_ranks, metavar="0|all|LIST",
                   help="which ranks of a torchrun job to follow: 0, all, or a list such as 0,2 (default: all for "
                        "json, 0 for the others; textgen follows rank 0 only)")


def _json_options(g) -> None:
    g.add_argument("--out", type=_template, default=DEFAULT_OUT,
                   help=f"output file; {{run}} and {{output_dir}} are replaced (default {DEFAULT_OUT})")


def _tb_options(g) -> None:
    from .tb_sink import DEFAULT_LOGDIR  # imported here: the other sinks do not load tensorboard (~1 s)

    g.add_argument("--logdir", type=_template, default=DEFAULT_LOGDIR,
                   help=f"TensorBoard log directory; each run gets a subdirectory (default {DEFAULT_LOGDIR})")


def _textgen_options(g) -> None:
    g.add_argument("--prompt", action="append", help="a prompt (repeatable; default 'The ')")
    g.add_argument("--device", default="cpu", help="where to generate (default cpu: the GPU stays the trainer's)")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=True, help="sample (default) "
                                                                                          "or greedy")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=60)


def _tail_options(g) -> None:
    g.add_argument("--events", help="comma-separated events to show (default: logs, saves, samples, "
                                    "control, warnings, system, end; with --json: every record)")
    g.add_argument("--json", action="store_true", help="print the records as JSON lines")
    g.add_argument("--system-every", type=_seconds, default=SYSTEM_EVERY, metavar="S",
                   help=f"at most one system line per rank every S seconds of the run "
                        f"(default {SYSTEM_EVERY:g}; 0: every system record)")
    g.add_argument("--progress", action="store_true",
                   help="on a terminal, keep one status line at the bottom: step/max, %%, step rate, ETA, "
                        "loss (fg-train --sinks tail turns it on when its output is a terminal; never "
                        "when piped)")


def _alert_options(g) -> None:
    g.add_argument("--webhook", metavar="URL", help="POST each alert as JSON to URL (retried a few times; only "
                                                    "its host is ever printed)")
    g.add_argument("--webhook-format", choices=FORMATS, default="json",
                   help="json: the alert itself (default); slack: {\"text\": ...}; discord: {\"content\": ...}")
    g.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                   help="run CMD (by /bin/sh) for each alert, the alert as JSON on its stdin (10 s at most)")
    g.add_argument("--min-interval", type=_seconds, default=60.0, metavar="S",
                   help="at most one alert per rule every S seconds of the run (default 60); the rest are counted")
    g.add_argument("--eval-patience", type=_count, default=5, metavar="N",
                   help="alert when the eval metric has not improved for N evaluations (default 5; 0: off)")
    g.add_argument("--eval-metric", default="eval_loss", metavar="NAME", help="the eval metric (default eval_loss)")
    g.add_argument("--greater-is-better", action="store_true", help="the eval metric improves upwards")
    g.add_argument("--throughput-drop", type=_fraction, default=0.5, metavar="F",
                   help="alert when samples_per_second falls below F x its median, after 10 logs (default 0.5; "
                        "0: off)")
    g.add_argument("--disable", type=_rules, default=[], metavar="RULES", help="comma-separated rules to turn off")
    g.add_argument("--alert-log", type=_template, default=DEFAULT_LOG, metavar="PATH",
                   help=f"the alerts raised, one JSON line each; a restarted sink sends none of them again "
                        f"(default {DEFAULT_LOG})")


def _custom_options(g) -> None:
    g.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for a module:ClassName sink (repeatable)")


def _tracker_options(kind: str):
    """A tracker sink's `add_arguments`, from its module (which imports no tracker library); None if the
    module is not there."""
    try:
        module = importlib.import_module(TRACKERS[kind])
    except ModuleNotFoundError as e:
        if e.name != TRACKERS[kind]:
            raise
        return None
    return module.add_arguments


CUSTOM = "module:ClassName"
#: each sink's own options (the group shown by `fg-sink KIND --help`); the common ones are in `_common`
OPTIONS = {"json": _json_options, "tb": _tb_options, "textgen": _textgen_options, "tail": _tail_options,
           "alert": _alert_options, "null": None, CUSTOM: _custom_options}
ALERT_RULES = "rules: " + ", ".join(RULES) + " (all on; --disable to turn some off)"


def parser(kind: str | None = None) -> argparse.ArgumentParser:
    """`fg-sink KIND`'s parser: the common options and KIND's own (a module:ClassName kind: --option);
    with no kind, every sink's (to say which sink an option belongs to)."""
    shown = kind
    if kind is not None and kind not in OPTIONS and kind not in TRACKERS:
        kind = CUSTOM if ":" in kind else None
    p = argparse.ArgumentParser(prog="fg-sink" if kind is None else f"fg-sink {shown}", description=__doc__,
                                epilog=EPILOG + NOTES if kind is None else NOTES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage=None if kind is None else "%(prog)s [options]", allow_abbrev=False)
    p.add_argument("kind", help="tb, json, textgen, tail, alert, mlflow, wandb, trackio, null, or module:ClassName "
                                "(`fg-sink KIND --help`: that sink's options)")
    _common(p)
    for name in ([kind] if kind is not None else [*OPTIONS, *TRACKERS]):
        add = _tracker_options(name) if name in TRACKERS else OPTIONS[name]
        if add is not None:
            add(p.add_argument_group(name if name != CUSTOM else "your own sink (module:ClassName)",
                                     ALERT_RULES if name == "alert" else None))
    return p


def owner_of(option: str) -> str | None:
    """The sink whose option `option` (e.g. "--temperature") is, or None for a common or unknown one."""
    for name in [*OPTIONS, *TRACKERS]:
        add = _tracker_options(name) if name in TRACKERS else OPTIONS[name]
        if add is None:
            continue
        probe = argparse.ArgumentParser(add_help=False)
        add(probe)
        if option in probe._option_string_actions:
            return name
    return None


def _kind_of(argv: list[str]) -> str | None:
    """The KIND word of a command line (the options may come before it)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("kind", nargs="?")
    _common(p)
    try:
        known, _ = p.parse_known_args(argv)
    except SystemExit:  # a bad common option: the full parser says what was wrong
        return None
    return known.kind


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, parsed by its sink's parser: an option of another sink is refused, with its name
    and the sink it belongs to (argparse would say only "unrecognized arguments")."""
    kind = _kind_of(argv)
    p = parser(kind)
    opts, rest = p.parse_known_args(argv)
    if rest:
        option = next((word.split("=", 1)[0] for word in rest if word.startswith("-")), None)
        owner = owner_of(option) if option else None
        if owner is not None:
            p.error(f"{option} is an option of `fg-sink {owner}`, not of `fg-sink {opts.kind}` "
                    f"(`fg-sink {opts.kind} --help` lists its options)")
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return opts


def build_sink(opts) -> Sink:
    sink = _build(opts)
    if opts.ranks is not None:
        if opts.kind == "textgen" and opts.ranks != "0":
            raise ValueError("textgen generates from rank 0's snapshots only: drop --ranks")
        sink.ranks = opts.ranks
    return sink


def _build(opts) -> Sink:
    if opts.kind == "json":
        return JsonSink(out=opts.out, group_readable=opts.group_readable)
    if opts.kind == "tb":
        from .tb_sink import TensorBoardSink

        return TensorBoardSink(logdir=opts.logdir, group_readable=opts.group_readable)
    if opts.kind == "tail":
        return TailSink(events=opts.events.split(",") if opts.events else None, as_json=opts.json,
                        system_every=opts.system_every, progress=opts.progress)
    if opts.kind == "alert":
        return AlertSink(webhook=opts.webhook, webhook_format=opts.webhook_format, exec_cmd=opts.exec_cmd,
                         min_interval=opts.min_interval, eval_patience=opts.eval_patience, eval_metric=opts.eval_metric,
                         greater_is_better=opts.greater_is_better, throughput_drop=opts.throughput_drop,
                         disable=opts.disable, alert_log=opts.alert_log, group_readable=opts.group_readable)
    if opts.kind == "null":
        return NullSink()
    if opts.kind in TRACKERS:
        if _tracker_options(opts.kind) is None:
            raise ValueError(f"the {opts.kind} sink is not part of this installation ({TRACKERS[opts.kind]})")
        return importlib.import_module(TRACKERS[opts.kind]).build(opts)
    if opts.kind == "textgen":
        from .textgen_sink import TextgenSink  # imports torch: only for this sink

        return TextgenSink(prompts=opts.prompt, device=opts.device, do_sample=opts.do_sample,
                           temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                           max_new_tokens=opts.max_new_tokens)
    module_name, sep, class_name = opts.kind.partition(":")
    if not sep:
        raise ValueError(f"unknown sink {opts.kind!r}: choose {', '.join(BUILTIN)}, or give module:ClassName")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for sink {opts.kind}: {e}") from None
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no class {class_name!r}") from None
    try:
        sink = cls(**dict(opts.option))
    except TypeError as e:
        raise ValueError(f"cannot build {opts.kind} with {dict(opts.option)}: {e}") from None
    if not callable(getattr(sink, "handle", None)):
        raise ValueError(f"{opts.kind} has no handle(record) method; subclass sinks.Sink")
    return sink if isinstance(sink, Sink) else _Adapted(sink, opts.kind)


class _Adapted(Sink):
    """A user class with handle() (and maybe close()) that does not subclass Sink: the hooks it lacks do nothing."""

    def __init__(self, inner, kind: str):
        self.inner = inner
        self.kind = kind

    def open_run(self, info):
        hook = getattr(self.inner, "open_run", None)
        return hook(info) if callable(hook) else None

    def handle(self, record):
        self.inner.handle(record)

    def end_run(self, status, reason=None):
        hook = getattr(self.inner, "end_run", None)
        if callable(hook):
            call_end_run(hook, status, reason)

    def close(self):
        hook = getattr(self.inner, "close", None)
        if callable(hook):
            hook()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))  # messages may quote records
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Private by default, like the journal: this covers files a library or a user sink creates, too.
    os.umask(umask_for(opts.group_readable))
    if opts.nice:
        os.nice(opts.nice)  # a sink is background work: never compete with the training step for a core
    try:
        sink = build_sink(opts)
    except ValueError as e:
        print(printable(f"fg-sink: error: {e}"), file=sys.stderr)
        return 2
    try:
        return run_sink(sink, run=opts.run, start=opts.start, follow=opts.follow, wait=opts.wait,
                        dead_after=opts.dead_after, argv=argv)
    except (registry.RunNotFound, ValueError) as e:  # ValueError: --ranks beyond the run's world size
        print(printable(f"fg-sink: error: {e}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
