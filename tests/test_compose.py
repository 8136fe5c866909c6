"""docker-compose.yml and the Dockerfile, checked statically (no docker engine needed).

Each check is a function returning a list of problems. The tests assert that the real files have none,
and that a set of plausible mistakes (a typo in a flag, a mismatched logdir, a port that is not exposed,
...) applied to a copy of them is caught by the check that is meant to catch it: every check can fail.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.metadata
import io
import re
import shlex
import string
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

VOLUME = "runs"
MOUNT = PurePosixPath("/runs")
NETWORK = "bus"
TRAINER = "trainer"
SERVICES = {"trainer", "tb-sink", "json-sink", "tensorboard"}
SINKS = ("tb-sink", "json-sink")


# -- loading -----------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value):
    """Compose's variable substitution with an empty environment: ${X:-default} -> default, $$ -> $."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_compose() -> dict:
    # safe_load resolves the anchors and `<<:` merge keys the file uses, as compose does.
    return interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def console_scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def services(compose: dict) -> dict[str, dict]:
    return compose.get("services") or {}


def command_of(service: dict) -> list[str] | None:
    cmd = service.get("command")
    if isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd):
        return cmd
    return None


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def _under(path: str, root: PurePosixPath = MOUNT) -> bool:
    p = PurePosixPath(path)
    return p.is_absolute() and ".." not in p.parts and (p == root or root in p.parents)


# -- the real argument parsers -----------------------------------------------------------------------------

def _parse(parse, args):
    """(namespace, None) or (None, argparse's error message)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(args), None
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "refused"


def parse_command(cmd: list[str]):
    """Parse a service's command with the program's own parser: (program, namespace) or raise ValueError."""
    program, args = cmd[0], cmd[1:]
    if program == "fg-train":
        from trainer.cli import parser
        opts, error = _parse(parser().parse_args, args)
    elif program == "fg-sink":
        from sinks.cli import BUILTIN, parse  # the sink's own parser: another sink's option is refused
        opts, error = _parse(parse, args)
        if opts is not None and opts.kind not in BUILTIN and ":" not in opts.kind:
            error = f"unknown sink kind {opts.kind!r} (choose {', '.join(BUILTIN)} or module:Class)"
    elif program == "fg-bus":
        from fg_bus.cli import parser
        opts, error = _parse(parser().parse_args, args)
    elif program == "tensorboard":
        from tensorboard import program as tb_program

        tb = tb_program.TensorBoard()
        # configure() parses argv (argv[0] is the program) with TensorBoard's own parser and starts nothing.
        _, error = _parse(lambda argv: tb.configure(argv=argv), cmd)
        opts = tb.flags if error is None else None
    else:
        raise ValueError(f"no parser known for {program!r}")
    if error is not None:
        raise ValueError(f"{' '.join(map(shlex.quote, cmd))}: {error}")
    return program, opts


def parsed(compose: dict) -> tuple[dict[str, object], list[str]]:
    """Every service's parsed options, and the problems met on the way."""
    out, problems = {}, []
    for name, svc in services(compose).items():
        cmd = command_of(svc)
        if cmd is None:
            problems.append(f"{name}: command is not an exec-form list of strings: {svc.get('command')!r}")
            continue
        try:
            out[name] = parse_command(cmd)[1]
        except ValueError as e:
            problems.append(f"{name}: {e}")
    return out, problems


# -- the checks --------------------------------------------------------------------------------------------

def check_single_image(compose: dict) -> list[str]:
    svcs = services(compose)
    problems = []
    if set(svcs) != SERVICES:
        problems.append(f"services are {sorted(svcs)}, expected {sorted(SERVICES)}")
    images = {name: (repr(svc.get("build")), svc.get("image")) for name, svc in svcs.items()}
    for name, (build, image) in images.items():
        if build == "None" or image is None:
            problems.append(f"{name}: needs both `build` (the repo's Dockerfile) and `image` (the shared tag)")
    if len(set(images.values())) > 1:
        groups: dict[tuple, list[str]] = {}
        for name, key in images.items():
            groups.setdefault(key, []).append(name)
        problems.append("services do not share one image: " + "; ".join(
            f"{', '.join(names)}: image {image!r}, build {build}" for (build, image), names in groups.items()))
    for name, svc in svcs.items():
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else (build or {}).get("dockerfile", "Dockerfile")
        if build is not None and (REPO / context / dockerfile).resolve() != DOCKERFILE:
            problems.append(f"{name}: builds {context}/{dockerfile}, not the repo's Dockerfile")
        if isinstance(build, dict):
            declared = set(dockerfile_args())
            unknown = set(build.get("args") or {}) - declared
            if unknown:
                problems.append(f"{name}: build args {sorted(unknown)} are not ARGs of the Dockerfile")
    return problems


def check_console_scripts(compose: dict) -> list[str]:
    scripts = console_scripts()
    tb_scripts = [ep for ep in importlib.metadata.entry_points(group="console_scripts")
                  if ep.name == "tensorboard" and ep.dist is not None and ep.dist.name.lower() == "tensorboard"]
    problems = []
    for name, svc in services(compose).items():
        cmd = command_of(svc)
        if cmd is None:
            problems.append(f"{name}: command is not an exec-form list of strings: {svc.get('command')!r}")
        elif name == "tensorboard":
            if cmd[0] != "tensorboard" or not tb_scripts:
                problems.append(f"{name}: {cmd[0]!r} is not the `tensorboard` script of the tensorboard distribution")
        elif cmd[0] not in scripts:
            problems.append(f"{name}: {cmd[0]!r} is not a console script of the package ({sorted(scripts)})")
    return problems


def check_arguments(compose: dict) -> list[str]:
    return parsed(compose)[1]


def _sink_path(template: str, output_dir: str | None) -> str | None:
    """A sink's --out / --logdir with {run} and {output_dir} filled in (None: an unknown placeholder)."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if not fields <= {"run", "output_dir"}:
        return None
    return template.format(run="RUN_ID", output_dir=output_dir or "fg-runs/NAME")


def check_volumes(compose: dict) -> list[str]:
    svcs = services(compose)
    problems = []
    if VOLUME not in (compose.get("volumes") or {}):
        problems.append(f"no top-level named volume {VOLUME!r}")
    for name, svc in svcs.items():
        mounts = []
        for v in svc.get("volumes") or []:
            if isinstance(v, str):
                source, _, rest = v.partition(":")
                mounts.append((source, rest.partition(":")[0]))
            else:
                mounts.append((v.get("source"), v.get("target")))
        if (VOLUME, str(MOUNT)) not in mounts:
            problems.append(f"{name}: does not mount the volume {VOLUME!r} at {MOUNT} (mounts: {mounts})")
    opts, _ = parsed(compose)
    trainer = opts.get(TRAINER)
    output_dir = str(trainer.output_dir) if trainer is not None and trainer.output_dir is not None else None
    if trainer is not None and (output_dir is None or not _under(output_dir)):
        problems.append(f"{TRAINER}: --output-dir {output_dir} is not under {MOUNT}")
    paths = {}
    for sink, option in (("tb-sink", "logdir"), ("json-sink", "out")):
        o = opts.get(sink)
        if o is None:
            continue
        if o.run != "latest" and not _under(o.run):
            problems.append(f"{sink}: --run {o.run} is neither `latest` nor under {MOUNT}")
        path = _sink_path(getattr(o, option), output_dir)
        if path is None:
            problems.append(f"{sink}: --{option} {getattr(o, option)} uses a placeholder other than {{run}}, "
                            "{output_dir}")
        elif not _under(path):
            problems.append(f"{sink}: --{option} {path} is not under {MOUNT}")
        paths[sink] = path
    board = opts.get("tensorboard")
    if board is not None:
        if not _under(board.logdir):
            problems.append(f"tensorboard: --logdir {board.logdir} is not under {MOUNT}")
        if "tb-sink" in paths and paths["tb-sink"] != board.logdir:
            problems.append(f"tb-sink writes {paths['tb-sink']} but tensorboard reads {board.logdir}")
    homes = {name: environment_of(svcs[name]).get("FG_HOME") for name in (TRAINER, *SINKS) if name in svcs}
    if len(set(homes.values())) != 1:
        problems.append(f"FG_HOME differs between the trainer and the sinks: {homes}")
    for name, home in homes.items():
        if not home or not _under(home):
            problems.append(f"{name}: FG_HOME={home!r} is not on the shared volume (under {MOUNT})")
    return problems


def _published(port_spec) -> tuple[str | None, str]:
    """(host port or None, container port) of a `ports:` entry, short or long syntax."""
    if isinstance(port_spec, dict):
        published = port_spec.get("published")
        return (None if published is None else str(published)), str(port_spec.get("target"))
    parts = str(port_spec).split("/")[0].split(":")
    return (parts[-2] if len(parts) >= 2 else None), parts[-1]


def check_network(compose: dict) -> list[str]:
    svcs = services(compose)
    problems = []
    opts, _ = parsed(compose)
    board = opts.get("tensorboard")
    if board is not None:
        published = [_published(p) for p in svcs["tensorboard"].get("ports") or []]
        if (str(board.port), str(board.port)) not in published or board.port != 6006:
            problems.append(f"tensorboard listens on {board.port} but publishes {published}; want 6006:6006")
        if board.host not in ("0.0.0.0", "::") and not board.bind_all:
            problems.append(f"tensorboard listens on {board.host!r}: unreachable through the published port")
    trainer = opts.get(TRAINER)
    if trainer is not None:
        if trainer.bus_tcp is None:
            problems.append(f"{TRAINER}: no --bus-tcp: the bus would be ipc sockets, invisible to other containers")
        else:
            host, _, port = trainer.bus_tcp.rpartition(":")
            if host in ("0.0.0.0", "*") and not trainer.insecure:
                problems.append(f"{TRAINER}: --bus-tcp {trainer.bus_tcp} without CURVE keys: fg-train refuses it "
                                "unless --insecure says the compose network is trusted")
            if host not in ("0.0.0.0", "*"):
                # Only then does run.json advertise the hostname; any other host is advertised as given.
                problems.append(f"{TRAINER}: --bus-tcp {trainer.bus_tcp} does not bind all interfaces, so run.json "
                                f"does not advertise tcp://{TRAINER}:{port}")
            exposed = {str(p).split("/")[0] for p in svcs[TRAINER].get("expose") or []}
            wanted = {str(int(port) + i) for i in range(3)}
            if int(port) == 0 or not wanted <= exposed:
                problems.append(f"{TRAINER}: --bus-tcp port {port}: expose {sorted(exposed)}, want {sorted(wanted)}")
            published = [_published(p)[1] for p in svcs[TRAINER].get("ports") or []]
            if wanted & set(published):
                problems.append(f"{TRAINER}: bus ports are published on the host ({published}); expose them only")
    if TRAINER in svcs and svcs[TRAINER].get("hostname") != TRAINER:
        problems.append(f"{TRAINER}: hostname {svcs[TRAINER].get('hostname')!r}; run.json advertises the "
                        f"hostname, which must resolve on the network: set `hostname: {TRAINER}`")
    if NETWORK not in (compose.get("networks") or {}):
        problems.append(f"no top-level network {NETWORK!r}")
    for name, svc in svcs.items():
        nets = svc.get("networks") or []
        if NETWORK not in nets:
            problems.append(f"{name}: not on the {NETWORK!r} network ({list(nets)})")
    for name in SINKS:
        svc = svcs.get(name, {})
        depends = svc.get("depends_on") or {}
        condition = depends.get(TRAINER, {}).get("condition") if isinstance(depends, dict) else (
            "service_started" if TRAINER in depends else None)
        if condition != "service_started":
            problems.append(f"{name}: should depend on {TRAINER} (service_started), has {depends!r}")
        if svc.get("restart") != "on-failure":
            problems.append(f"{name}: restart is {svc.get('restart')!r}, want on-failure (a sink resumes)")
    return problems


# -- the Dockerfile ----------------------------------------------------------------------------------------

def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8") if text is None else text
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_args(text: str | None = None) -> list[str]:
    return [rest.split("=")[0].strip() for kw, rest in dockerfile_instructions(text) if kw == "ARG"]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` (or a folder above it) out of the build context."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        forms = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            excluded = not negate
    return excluded


def _read_ignore(text: str | None) -> list[str]:
    text = DOCKERIGNORE.read_text(encoding="utf-8") if text is None and DOCKERIGNORE.exists() else (text or "")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def check_dockerfile(text: str | None = None, ignore: str | None = None) -> list[str]:
    if text is None and not DOCKERFILE.exists():
        return ["no Dockerfile at the repo root"]
    instructions = dockerfile_instructions(text)
    patterns = _read_ignore(ignore)
    problems = []
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    if not froms or not re.match(r"(docker\.io/(library/)?)?python:3\.11([-.@]|$)", froms[0].split()[0]):
        problems.append(f"the base image is {froms[:1]}, want python:3.11(-slim)")
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    needed = {"pyproject.toml", project["project"].get("readme", "README.md")}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]
               if p.endswith("*") and "." not in p}
    copied: set[str] = set()
    installed = False
    for kw, rest in instructions:
        if kw in ("COPY", "ADD"):
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                matches = list(REPO.glob(source)) if any(c in source for c in "*?[") else [REPO / source]
                if not any(m.exists() for m in matches):
                    problems.append(f"{kw} {source}: no such file or directory in the repo")
                elif dockerignore_excludes(source.rstrip("/") or ".", patterns):
                    problems.append(f"{kw} {source}: excluded from the build context by .dockerignore")
                copied |= {"."} if source in (".", "./") else {PurePosixPath(source).parts[0]}
        if kw == "RUN" and re.search(r"pip install (--?[\w-]+(=\S+)? )*\.(\s|$|&|;)", rest):
            installed = True
            missing = sorted(n for n in needed if "." not in copied and n not in copied)
            if missing:
                problems.append(f"`pip install .` runs before {missing} are copied in")
    if not installed:
        problems.append("the Dockerfile never runs `pip install .`")
    for arg in ("TORCH_SPEC", "TORCH_INDEX"):
        if arg not in dockerfile_args(text):
            problems.append(f"no build ARG {arg}")
    return problems


# -- tests: the real files ---------------------------------------------------------------------------------

CHECKS = {
    "single_image": check_single_image,
    "console_scripts": check_console_scripts,
    "arguments": check_arguments,
    "volumes": check_volumes,
    "network": check_network,
}


def test_compose_parses():
    compose = load_compose()
    assert isinstance(compose, dict) and set(services(compose)) == SERVICES


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_compose(check):
    assert CHECKS[check](load_compose()) == []


def test_dockerfile():
    assert check_dockerfile() == []


def test_tensorboard_is_the_tensorboard_distributions_script():
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "tensorboard"]
    assert eps and eps[0].dist.name.lower() == "tensorboard"


# -- tests: every check catches the mistakes it is for ----------------------------------------------------

def _cmd(service: str, old: str, new: str):
    def mutate(c):
        cmd = c["services"][service]["command"]
        cmd[cmd.index(old)] = new
    return mutate


def _set(service: str, key: str, value):
    def mutate(c):
        if value is None:
            c["services"][service].pop(key, None)
        else:
            c["services"][service][key] = value
    return mutate


def _env(service: str, value):
    def mutate(c):
        env = c["services"][service]["environment"] = dict(c["services"][service]["environment"])
        if value is None:
            env.pop("FG_HOME")
        else:
            env["FG_HOME"] = value
    return mutate


def _all_env(value):
    def mutate(c):
        for name in (TRAINER, *SINKS):
            _env(name, value)(c)
    return mutate


def _drop_top(key: str):
    def mutate(c):
        c.pop(key)
    return mutate


MUTATIONS = [
    # a typo in a flag or a value the real parser refuses
    ("arguments", "trainer flag typo", _cmd("trainer", "--output-dir", "--output-dri")),
    ("arguments", "trainer bad bus-tcp", _cmd("trainer", "0.0.0.0:5555", "0.0.0.0")),
    ("arguments", "tb-sink flag typo", _cmd("tb-sink", "--logdir", "--logidr")),
    ("arguments", "json-sink flag typo", _cmd("json-sink", "--wait", "--wiat")),
    ("arguments", "json-sink bad wait value", _cmd("json-sink", "600", "ten")),
    ("arguments", "json-sink unknown kind", _cmd("json-sink", "json", "jsno")),
    ("arguments", "tensorboard flag typo", _cmd("tensorboard", "--port", "--prot")),
    ("arguments", "command as a string", _set("trainer", "command", "fg-train --output-dir /runs/default")),
    # console scripts
    ("console_scripts", "not a console script", _cmd("trainer", "fg-train", "fg-training")),
    ("console_scripts", "not tensorboard's script", _cmd("tensorboard", "tensorboard", "tensorbord")),
    ("console_scripts", "tensorboard run by a fg script", _cmd("tensorboard", "tensorboard", "fg-sink")),
    ("console_scripts", "shell-form command", _set("json-sink", "command", "fg-sink json")),
    # one image
    ("single_image", "another image tag", _set("tensorboard", "image", "fg-bus:other")),
    ("single_image", "no build", _set("json-sink", "build", None)),
    ("single_image", "another build", _set("tb-sink", "build", {"context": ".", "dockerfile": "Dockerfile",
                                                                "args": {"TORCH_SPEC": "torch"}})),
    ("single_image", "a build arg the Dockerfile lacks",
     lambda c: [s["build"].setdefault("args", {}).update(TORCH_VERSION="2") for s in c["services"].values()]),
    ("single_image", "a service missing", lambda c: c["services"].pop("json-sink")),
    # volumes and paths
    ("volumes", "tb logdir mismatch", _cmd("tensorboard", "/runs/tb", "/runs/tensorboard")),
    ("volumes", "tb-sink logdir off the volume", _cmd("tb-sink", "/runs/tb", "/tmp/tb")),
    ("volumes", "json out off the volume", _cmd("json-sink", "/runs/json/{run}.jsonl", "/data/{run}.jsonl")),
    ("arguments", "json out unknown placeholder", _cmd("json-sink", "/runs/json/{run}.jsonl", "/runs/{name}.jsonl")),
    ("volumes", "json out escaping the volume", _cmd("json-sink", "/runs/json/{run}.jsonl", "/runs/../x.jsonl")),
    ("volumes", "trainer output off the volume", _cmd("trainer", "/runs/default", "/out")),
    ("volumes", "trainer output relative", _cmd("trainer", "/runs/default", "runs/default")),
    ("volumes", "FG_HOME mismatch", _env("json-sink", "/runs/.fg2")),
    ("volumes", "FG_HOME missing", _env("tb-sink", None)),
    ("volumes", "FG_HOME off the volume", _all_env("/home/fg/.fg")),
    ("volumes", "volume not mounted", _set("tensorboard", "volumes", [])),
    ("volumes", "volume mounted elsewhere", _set("trainer", "volumes", ["runs:/data"])),
    ("volumes", "a bind mount instead", _set("json-sink", "volumes", ["./runs:/runs"])),
    ("volumes", "no top-level volume", _drop_top("volumes")),
    # ports, hostname, network, start order
    ("network", "tensorboard published on another port", _set("tensorboard", "ports", ["6006:6007"])),
    ("network", "tensorboard not published", _set("tensorboard", "ports", None)),
    ("network", "tensorboard listens elsewhere", _cmd("tensorboard", "6006", "6007")),
    ("network", "tensorboard on localhost only", _cmd("tensorboard", "0.0.0.0", "127.0.0.1")),
    ("network", "inbox port not exposed", _set("trainer", "expose", ["5555", "5556"])),
    ("network", "bus on all interfaces without --insecure", lambda c: c["services"]["trainer"]["command"].remove(
        "--insecure")),
    ("network", "bus port moved", _cmd("trainer", "0.0.0.0:5555", "0.0.0.0:6000")),
    ("network", "bus on loopback", _cmd("trainer", "0.0.0.0:5555", "127.0.0.1:5555")),
    ("network", "bus ports published", _set("trainer", "ports", ["5555:5555"])),
    ("network", "no --bus-tcp", lambda c: c["services"]["trainer"].update(
        command=["fg-train", "--output-dir", "/runs/default"])),
    ("network", "wrong hostname", _set("trainer", "hostname", "train")),
    ("network", "no hostname", _set("trainer", "hostname", None)),
    ("network", "sink off the network", _set("json-sink", "networks", ["other"])),
    ("network", "no top-level network", _drop_top("networks")),
    ("network", "no depends_on", _set("tb-sink", "depends_on", None)),
    ("network", "depends_on healthy", _set("tb-sink", "depends_on", {"trainer": {"condition": "service_healthy"}})),
    ("network", "no restart", _set("json-sink", "restart", None)),
]


@pytest.mark.parametrize("check,mutate", [(c, m) for c, _, m in MUTATIONS], ids=[i for _, i, _ in MUTATIONS])
def test_check_catches(check, mutate):
    compose = copy.deepcopy(load_compose())
    mutate(compose)
    assert CHECKS[check](compose), f"check_{check} accepted the broken compose file"


def _edit(old: str, new: str, count: int = 1):
    def mutate(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)
    return mutate


DOCKERFILE_MUTATIONS = [
    ("another python", _edit("FROM python:3.11-slim", "FROM python:3.12-slim"), None),
    ("no pip install .", _edit("RUN pip install . &&", "RUN pip install -e fg_bus &&"), None),
    ("COPY of a missing file", _edit("COPY README.md ./", "COPY README.rst ./"), None),
    ("a package not copied", _edit("COPY sinks ./sinks\n", ""), None),
    ("a package copied after the install", lambda t: t.replace("COPY trainer ./trainer\n", "").replace(
        "COPY examples ./examples", "COPY examples ./examples\nCOPY trainer ./trainer"), None),
    ("a source excluded by .dockerignore", None, "fg_bus\n"),
    ("a source excluded by a glob", None, "**/*.toml\n"),
    ("no TORCH_INDEX arg", _edit('ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"\n', ""), None),
]


@pytest.mark.parametrize("edit,ignore", [(e, i) for _, e, i in DOCKERFILE_MUTATIONS],
                         ids=[n for n, _, _ in DOCKERFILE_MUTATIONS])
def test_dockerfile_check_catches(edit, ignore):
    text = DOCKERFILE.read_text(encoding="utf-8")
    if edit is not None:
        text = edit(text)
    if ignore is not None:
        ignore = DOCKERIGNORE.read_text(encoding="utf-8") + ignore
    assert check_dockerfile(text, ignore), "check_dockerfile accepted the broken Dockerfile"


def test_dockerignore_matching():
    patterns = _read_ignore(None)
    for kept in ("pyproject.toml", "README.md", "fg_bus", "sinks/cli.py", "trainer/default.yaml", "examples"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (".venv", ".git", "fg_bus/__pycache__", "__pycache__", "fg_bus.egg-info", "fg-runs", "tests"):
        assert dockerignore_excludes(dropped, patterns), dropped
