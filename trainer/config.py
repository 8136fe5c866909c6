"""YAML configurations in the seed document's style.

Tags:
  `!singleton:module:Callable`  call `Callable` once: with a sequence (positional arguments), a mapping
                                (keyword arguments, or `args:` / `kwargs:` keys), a scalar (one argument)
                                or nothing. An anchored node is built once; every alias shares it.
  `!list` / `!list:@name`       a list (the name labels it, for `named`)
  `!dict` / `!dict:@name`       a dict
  `!var NAME`                   a value the caller passes in (`fg-train CONFIG --var NAME=VALUE`)
plus YAML's own anchors, aliases and `<<` merge keys.

Configs are code: no expression is evaluated, but a `!singleton` tag imports the module it names and calls
the callable with the given arguments, so a config can do whatever that callable does (`!singleton:os:system`
runs a shell command). For configs you did not write, `load_config(..., allow_modules=[...])` (`fg-train
--allow-module PREFIX`) refuses, before importing it, every module outside the given packages, and every
callable reached through or defined in one. Every error names the file and line: an unknown tag, a failed
import, a refused module, a bad keyword, a missing variable.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import re
import sys
import types
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KNOWN_TAGS = ("!singleton:module:Callable", "!list[:@name]", "!dict[:@name]", "!var NAME")

# What the built-in config (trainer/default.yaml) imports: allowed whenever modules are restricted.
DEFAULT_ALLOWED_MODULES = ("trainer.data", "trainer.chargpt")

# The restriction of the config being built, inherited by any config it loads in turn (a config calling
# `trainer.config:load_config` must not escape its own restriction).
_ALLOWED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("fg_allowed_modules", default=None)


class ConfigError(ValueError):
    """A configuration problem, with the file and line it comes from."""


def _where(loader: "_Loader", node: yaml.Node) -> str:
    return f"{loader.config_path}:{node.start_mark.line + 1}"


def module_allowed(name: str, allowed: tuple[str, ...] | None) -> bool:
    """`name` is one of the allowed modules or inside one of the allowed packages (None: no restriction)."""
    if allowed is None:
        return True
    return any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in allowed)


def _refuse(loader: "_Loader", node: yaml.Node, target: str, module: str, why: str) -> ConfigError:
    allowed = ", ".join(loader.allowed_modules or ())
    return ConfigError(f"{_where(loader, node)}: !singleton:{target}: {why} {module!r}, which is not allowed "
                       f"(allowed: {allowed}); configs are code, so check it before adding "
                       f"--allow-module {module.split('.')[0]}")


def _import_target(loader: "_Loader", node: yaml.Node, target: str):
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"{_where(loader, node)}: !singleton:{target} should name module:Callable, "
                          "e.g. !singleton:trainer:TrainingArguments")
    allowed = loader.allowed_modules
    if not module_allowed(module_name, allowed):  # refused before importing: an import runs code too
        raise _refuse(loader, node, target, module_name, "imports module")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{_where(loader, node)}: cannot import {module_name!r} for !singleton:{target}: {e}") from e
    except Exception as e:  # the module exists but fails while importing (a SyntaxError in my_callbacks.py)
        raise ConfigError(f"{_where(loader, node)}: importing {module_name!r} for !singleton:{target} failed: "
                          f"{type(e).__name__}: {e}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"{_where(loader, node)}: module {module_name!r} has no attribute {attr_path!r} "
                              f"(from !singleton:{target})") from None
        # An allowed module's imports are not allowed with it: trainer.data:torch.load reaches torch.
        if isinstance(obj, types.ModuleType) and not module_allowed(obj.__name__, allowed):
            raise _refuse(loader, node, target, obj.__name__, "reaches module")
    home = getattr(obj, "__module__", None)
    if isinstance(home, str) and not module_allowed(home, allowed):  # re-exported: `from os import system`
        raise _refuse(loader, node, target, home, "names a callable defined in module")
    if not callable(obj):
        raise ConfigError(f"{_where(loader, node)}: {target} is not callable")
    return obj


def _construct_singleton(loader: "_Loader", target: str, node: yaml.Node):
    fn = _import_target(loader, node, target)
    args: list = []
    kwargs: dict = {}
    if isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        if mapping and set(mapping) <= {"args", "kwargs"}:
            args, kwargs = mapping.get("args") or [], mapping.get("kwargs") or {}
            if not isinstance(args, list):
                raise ConfigError(f"{_where(loader, node)}: args: of {target} must be a list, "
                                  f"got {type(args).__name__}")
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{_where(loader, node)}: kwargs: of {target} must be a mapping, "
                                  f"got {type(kwargs).__name__}")
            args, kwargs = list(args), dict(kwargs)
        else:
            kwargs = mapping
    else:
        value = loader.construct_scalar(node)
        if value:
            args = [value]  # a scalar is one (string) argument: !singleton:pathlib:Path ./runs
    bad_keys = [k for k in kwargs if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{_where(loader, node)}: keyword names must be strings, got {bad_keys!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself check
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{_where(loader, node)}: bad arguments for {target}: {e}") from None
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{_where(loader, node)}: {target}(...) failed: {type(e).__name__}: {e}") from e


def _label(loader: "_Loader", suffix: str, node: yaml.Node, kind: str) -> str | None:
    if not suffix:
        return None
    if not suffix.startswith(":@") or len(suffix) < 3:
        raise ConfigError(f"{_where(loader, node)}: unknown tag !{kind}{suffix}; write !{kind} or !{kind}:@name")
    return suffix[2:]


def _collection_constructor(kind: str, node_type: type, construct: str):
    def build(loader: "_Loader", suffix: str, node: yaml.Node):
        name = _label(loader, suffix, node, kind)
        if not isinstance(node, node_type):
            raise ConfigError(f"{_where(loader, node)}: !{kind} needs a {node_type.id}")
        value = getattr(loader, construct)(node, deep=True)
        if name:
            loader.named[name] = value
        return value
    return build


_construct_list = _collection_constructor("list", yaml.SequenceNode, "construct_sequence")
_construct_dict = _collection_constructor("dict", yaml.MappingNode, "construct_mapping")


def _construct_var(loader: "_Loader", node: yaml.Node):
    if not isinstance(node, yaml.ScalarNode) or not loader.construct_scalar(node):
        raise ConfigError(f"{_where(loader, node)}: !var needs a variable name, e.g. !var run_name")
    name = loader.construct_scalar(node)
    if name not in loader.variables:
        known = ", ".join(sorted(loader.variables)) or "none"
        raise ConfigError(f"{_where(loader, node)}: variable {name!r} was not given (known: {known}); "
                          f"pass it with --var {name}=VALUE")
    return loader.variables[name]


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader reading exponent floats as floats (below); used for --var values and as _Loader's base."""


# YAML 1.1 (PyYAML) reads `1e-4` and `5.0e9` as strings; YAML 1.2, and everyone writing `learning_rate: 1e-4`,
# means a float. Floats with a dot and a signed exponent (`3.0e-3`) already resolve; this adds the rest.
_PlainLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A command-line value read as a YAML scalar the way a config reads it (`1e-4` is a float)."""
    return yaml.load(text, Loader=_PlainLoader) if text else ""


def default_config_path() -> Path:
    """The packaged config `fg-train` runs with no arguments."""
    return Path(str(resources.files("trainer").joinpath("default.yaml")))


def peek_arg(path: str | Path, name: str) -> str | None:
    """`args: NAME:` as written in a config (a scalar's text, even a `!var` one's), read without building
    anything; None if it is not there or the file does not parse (load_config reports that properly)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key, value in node.value:
        if key.value == "args" and isinstance(value, yaml.MappingNode):
            for k, v in value.value:
                if k.value == name and isinstance(v, yaml.ScalarNode):
                    return v.value
    return None


def peek_seed(path: str | Path) -> int | None:
    """`args: seed:` from a config, read without building anything (so the seed can be set first)."""
    value = peek_arg(path, "seed")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _Loader(_PlainLoader):
    """A SafeLoader with the fg tags; one instance per file, holding its variables and named values."""

    def __init__(self, stream, config_path: str, variables: dict[str, Any],
                 allowed_modules: tuple[str, ...] | None = None):
        super().__init__(stream)
        self.config_path = config_path
        self.variables = variables
        self.allowed_modules = allowed_modules
        self.named: dict[str, Any] = {}

    def construct_undefined(self, node):
        raise ConfigError(f"{_where(self, node)}: unknown tag {node.tag}; known tags: {', '.join(KNOWN_TAGS)}")


_Loader.add_multi_constructor("!singleton:", _construct_singleton)
_Loader.add_multi_constructor("!list", _construct_list)
_Loader.add_multi_constructor("!dict", _construct_dict)
_Loader.add_constructor("!var", _construct_var)
# Route every other tag, including YAML's unknown "!!python/..." ones, to construct_undefined.
_Loader.add_constructor(None, _Loader.construct_undefined)


@dataclass
class LoadedConfig:
    """The top-level mapping of a config file, with where each top-level key sits."""

    path: Path
    values: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)
    named: dict[str, Any] = field(default_factory=dict)

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}" if key in self.lines else str(self.path)


def load_config(path: str | Path, variables: dict[str, Any] | None = None,
                allow_modules: list[str] | tuple[str, ...] | None = None) -> LoadedConfig:
    """Parse and build a configuration file. Raises ConfigError (file:line: reason) on any problem.

    `allow_modules`: module or package names (`trainer` allows trainer and trainer.data, not trainer_x);
    when given, the config may import only those (and DEFAULT_ALLOWED_MODULES). None: no restriction, or
    the restriction of the config that is loading this one."""
    path = Path(path)
    inherited = _ALLOWED.get()
    allowed = inherited if allow_modules is None else tuple(allow_modules) + DEFAULT_ALLOWED_MODULES
    if inherited is not None and allow_modules is not None:  # a nested load can narrow, never widen
        allowed = tuple(m for m in allowed if module_allowed(m, inherited))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # Modules beside the config (my_callbacks.py) import as they would from a script in that directory.
    config_dir = str(path.resolve().parent)
    if config_dir not in sys.path:
        # Restricted, they come after the installed packages: a `torch.py` beside the config must not stand
        # in for an allowed package.
        sys.path.insert(len(sys.path) if allowed is not None else 0, config_dir)
    try:
        loader = _Loader(text, str(path), dict(variables or {}), allowed)
    except yaml.reader.ReaderError as e:  # a control character: checked before any parsing, so no mark
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{path}:{line}: invalid YAML: unacceptable character #x{e.character:04x}: "
                          f"{e.reason}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: the file is empty")
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: the top level must be a mapping of keys")
        lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
        token = _ALLOWED.set(allowed)
        try:
            values = loader.construct_document(node)
        finally:
            _ALLOWED.reset(token)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {e.problem or e}") from None
    finally:
        loader.dispose()
    return LoadedConfig(path=path, values=values, lines=lines, named=loader.named)
