"""The YAML config loader (trainer/config.py), building a Trainer from a config (trainer/run_config.py), and
the example configs in examples/. Every config is a small file written into tmp_path; every error must name
the file and the line it comes from."""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest

from conftest import REPO, EventRecorder, RegressionDataset, TinyRegression
from trainer import EarlyStoppingCallback, Trainer, TrainingArguments
from trainer.cli import main as fg_train
from trainer.cli import parser as fg_train_parser
from trainer.config import ConfigError, LoadedConfig, load_config
from trainer.data import CharTokenizer
from trainer.run_config import build_trainer, load_trainer

EXAMPLES = Path(REPO) / "examples"
CUSTOM = EXAMPLES / "custom_callbacks.yaml"
EARLY_STOPPING = EXAMPLES / "early_stopping.yaml"

HELPERS_MODULE = "fgcfg_test_helpers"
HELPERS = '''
"""Factories for tests/trainer/test_config.py."""

MADE = []


def record(*args, **kwargs):
    return args, kwargs


def strict(a, b=2, *, c=3):
    return a, b, c


def boom(message="boom"):
    raise RuntimeError(message)


def touch(path):
    open(path, "w").close()
    return path


class Made:
    def __init__(self, label=None):
        self.label = label
        MADE.append(self)
'''


@pytest.fixture(autouse=True)
def _isolated_sys_path(tmp_path_factory, monkeypatch):
    """load_config puts each config's directory on sys.path: undo that after every test. The helpers module
    lives in one directory for the session, so every test imports the same module object."""
    helpers_dir = tmp_path_factory.getbasetemp() / "fgcfg-helpers"
    if not (helpers_dir / f"{HELPERS_MODULE}.py").exists():
        helpers_dir.mkdir(exist_ok=True)
        (helpers_dir / f"{HELPERS_MODULE}.py").write_text(HELPERS, encoding="utf-8")
    monkeypatch.setattr(sys, "path", [str(helpers_dir), *sys.path])


@pytest.fixture
def helpers():
    import importlib

    module = importlib.import_module(HELPERS_MODULE)
    module.MADE.clear()
    return module


@pytest.fixture
def write(tmp_path):
    """write(text, name="cfg.yaml") -> the path of a config file holding the dedented text."""

    def _write(text: str, name: str = "cfg.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return _write


def at(path: Path, line: int) -> str:
    """The `file:line:` prefix every ConfigError starts with, as a regex."""
    return "^" + re.escape(f"{path}:{line}: ")


def line_of(path: Path, fragment: str) -> int:
    """The 1-based line of the first line of `path` containing `fragment`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in {path}")


# -- !singleton arguments ------------------------------------------------------------------------------


def test_singleton_sequence_is_positional_arguments(write, helpers):
    config = load_config(write(f"""
        x: !singleton:{HELPERS_MODULE}:record [1, two, 3.5, [a, b], null]
    """))
    assert config.values["x"] == ((1, "two", 3.5, ["a", "b"], None), {})


def test_singleton_mapping_is_keyword_arguments(write, helpers):
    config = load_config(write(f"""
        x: !singleton:{HELPERS_MODULE}:record
            alpha: 1
            beta: [1, 2]
            gamma: {{nested: true}}
    """))
    assert config.values["x"] == ((), {"alpha": 1, "beta": [1, 2], "gamma": {"nested": True}})


def test_singleton_args_and_kwargs_keys(write, helpers):
    config = load_config(write(f"""
        both: !singleton:{HELPERS_MODULE}:record
            args: [1, 2]
            kwargs:
                c: 3
        args_only: !singleton:{HELPERS_MODULE}:record
            args: [x]
        kwargs_only: !singleton:{HELPERS_MODULE}:record
            kwargs: {{k: v}}
        bound: !singleton:{HELPERS_MODULE}:strict
            args: [10]
            kwargs: {{c: 30}}
    """))
    assert config.values["both"] == ((1, 2), {"c": 3})
    assert config.values["args_only"] == (("x",), {})
    assert config.values["kwargs_only"] == ((), {"k": "v"})
    assert config.values["bound"] == (10, 2, 30)


def test_singleton_scalar_is_one_string_argument_and_nothing_is_no_argument(write, helpers):
    config = load_config(write(f"""
        path: !singleton:pathlib:PurePosixPath runs/a
        number: !singleton:{HELPERS_MODULE}:record 5
        nothing: !singleton:{HELPERS_MODULE}:record
        empty_map: !singleton:{HELPERS_MODULE}:record {{}}
    """))
    assert config.values["path"] == PurePosixPath("runs/a")
    assert config.values["number"] == (("5",), {})  # a scalar argument is the string as written
    assert config.values["nothing"] == ((), {})
    assert config.values["empty_map"] == ((), {})


def test_singleton_dotted_attribute_and_nested_singletons(write):
    config = load_config(write("""
        tok: !singleton:trainer.data:CharTokenizer.from_text [hello]
        args: !singleton:trainer:TrainingArguments
            output_dir: !singleton:pathlib:PurePosixPath runs/nested
            max_steps: 7
    """))
    assert isinstance(config.values["tok"], CharTokenizer)
    assert config.values["tok"].decode(config.values["tok"].encode("hello")) == "hello"
    assert isinstance(config.values["args"], TrainingArguments)
    assert config.values["args"].output_dir == "runs/nested" and config.values["args"].max_steps == 7


# -- anchors, !list, !dict, !var, merge keys -------------------------------------------------------------


def test_anchor_aliased_twice_is_the_same_object_built_once(write, helpers):
    config = load_config(write(f"""
        shared: &shared !singleton:{HELPERS_MODULE}:Made {{label: one}}
        again: *shared
        inside: [*shared, {{key: *shared}}]
        other: !singleton:{HELPERS_MODULE}:Made {{label: one}}
    """))
    values = config.values
    assert values["again"] is values["shared"]
    assert values["inside"][0] is values["shared"]
    assert values["inside"][1]["key"] is values["shared"]
    assert values["other"] is not values["shared"]  # an identical node without the alias is another object
    assert len(helpers.MADE) == 2


def test_list_and_dict_with_and_without_names(write):
    config = load_config(write("""
        plain_list: !list [1, 2]
        named_list: &named_list !list:@prompts
            - The weather today is
            - Machine learning is
        plain_dict: !dict {a: 1}
        named_dict: !dict:@generation_config
            do_sample: true
            max_new_tokens: 50
        uses: *named_list
    """))
    values = config.values
    assert values["plain_list"] == [1, 2] and values["plain_dict"] == {"a": 1}
    assert values["named_list"] == ["The weather today is", "Machine learning is"]
    assert values["named_dict"] == {"do_sample": True, "max_new_tokens": 50}
    assert isinstance(config, LoadedConfig)
    assert set(config.named) == {"prompts", "generation_config"}  # only the labelled ones
    assert config.named["prompts"] is values["named_list"] is values["uses"]
    assert config.named["generation_config"] is values["named_dict"]


def test_empty_named_list(write):
    config = load_config(write("trainer_callbacks: !list:@trainer_callbacks []\n"))
    assert config.values["trainer_callbacks"] == [] and config.named == {"trainer_callbacks": []}


def test_var_substitutes_the_value_passed(write, helpers):
    sentinel = object()
    config = load_config(write(f"""
        name: !var run_name
        steps: !var steps
        obj: !singleton:{HELPERS_MODULE}:record [!var thing]
        anchored: &n !var run_name
        alias: *n
    """), {"run_name": "trial-1", "steps": 12, "thing": sentinel})
    values = config.values
    assert values["name"] == "trial-1" and values["steps"] == 12
    assert values["obj"][0][0] is sentinel  # the very object given, not a copy
    assert values["alias"] == "trial-1"


def test_merge_key_into_kwargs(write, helpers):
    config = load_config(write(f"""
        experiment_info: &experiment_info !dict:@experiment_info
            name: My Experiment
            description: Testing new architecture
        extra: &extra {{date: "2024-01-01"}}
        logger: !singleton:{HELPERS_MODULE}:record
            args: [writer]
            kwargs:
                <<: *experiment_info
                description: overridden here
        both: !singleton:{HELPERS_MODULE}:record
            <<: [*experiment_info, *extra]
    """))
    values = config.values
    assert values["logger"] == (("writer",),
                                {"name": "My Experiment", "description": "overridden here"})  # explicit keys win
    assert values["both"] == ((), {"name": "My Experiment", "description": "Testing new architecture",
                                   "date": "2024-01-01"})
    assert config.named["experiment_info"] == {"name": "My Experiment", "description": "Testing new architecture"}


def test_exponent_floats_are_floats(write, tmp_path):
    # YAML 1.1 (plain PyYAML) reads 1e-4 as the string "1e-4"; configs mean the float, as YAML 1.2 does.
    config = load_config(write("""
        model: !singleton:conftest:TinyRegression
        args:
            learning_rate: 1e-4
            adam_epsilon: 1.0E-9
            weight_decay: +5e-2
        others: [3.0e-3, 2E3, .5e1, "1e-4", 1e, 12e]
    """))
    assert config.values["others"] == [0.003, 2000.0, 5.0, "1e-4", "1e", "12e"]  # quoted or malformed: strings
    args = build_trainer(config, {"output_dir": str(tmp_path)}).args
    assert (args.learning_rate, args.adam_epsilon, args.weight_decay) == (1e-4, 1e-9, 0.05)


def test_top_level_lines_are_recorded(write):
    path = write("""
        # a comment
        a: 1

        b: 2
    """)
    config = load_config(path)
    assert config.lines == {"a": 2, "b": 4}
    assert config.where("b") == f"{path}:4" and config.where("missing") == str(path)


# -- building a Trainer ----------------------------------------------------------------------------------

TINY = """
    model: !singleton:conftest:TinyRegression {dim: 4}
    train_dataset: !singleton:conftest:RegressionDataset {n: 8}
    eval_dataset: !singleton:conftest:RegressionDataset {n: 4, seed: 1}
    recorder: &recorder !singleton:conftest:EventRecorder
    args:
        max_steps: 5
        per_device_train_batch_size: 4
        learning_rate: 0.01
        logging_steps: 2
        eval_strategy: steps
        eval_steps: 2
        save_strategy: "no"
        use_cpu: true
        disable_tqdm: true
    trainer_callbacks: !list:@trainer_callbacks
        - *recorder
"""


def test_build_trainer_from_config(write, tmp_path):
    config = load_config(write(TINY))
    trainer = build_trainer(config, {"max_steps": 2, "output_dir": str(tmp_path / "out")})
    assert isinstance(trainer, Trainer)
    assert isinstance(trainer.model, TinyRegression)
    assert isinstance(trainer.train_dataset, RegressionDataset) and len(trainer.train_dataset) == 8
    assert trainer.args.max_steps == 2 and trainer.args.output_dir == str(tmp_path / "out")  # overridden
    assert trainer.args.learning_rate == 0.01 and trainer.args.eval_steps == 2  # from the config
    recorder = config.values["recorder"]
    assert isinstance(recorder, EventRecorder)
    assert any(cb is recorder for cb in trainer.callback_handler.callbacks)
    assert config.named["trainer_callbacks"] == [recorder]

    trainer.train()
    assert trainer.state.global_step == 2
    assert ("on_evaluate", 2, ("epoch", "eval_loss", "eval_runtime", "eval_samples_per_second",
                               "eval_steps_per_second")) in recorder.events


def test_build_trainer_with_training_arguments_singleton_and_tokenizer_key(write, tmp_path):
    config = load_config(write("""
        model: !singleton:conftest:TinyRegression
        tokenizer: &tok !singleton:trainer.data:CharTokenizer.from_text [abc]
        args: !singleton:trainer:TrainingArguments
            max_steps: 4
            output_dir: ignored
            use_cpu: true
    """))
    trainer = build_trainer(config, {"output_dir": str(tmp_path), "seed": 3})
    assert trainer.args.max_steps == 4 and trainer.args.seed == 3 and trainer.args.output_dir == str(tmp_path)
    assert trainer.processing_class is config.values["tokenizer"]
    assert isinstance(config.values["args"], TrainingArguments)
    assert config.values["args"].output_dir == "ignored"  # the config's object itself is not changed


def test_load_trainer_passes_variables_and_overrides(write, tmp_path):
    path = write(TINY.replace("max_steps: 5", "max_steps: !var steps"))
    trainer = load_trainer(path, {"steps": 9}, {"output_dir": str(tmp_path)})
    assert trainer.args.max_steps == 9 and trainer.args.output_dir == str(tmp_path)


def test_build_trainer_warns_about_a_misspelt_top_level_key(write, tmp_path, caplog):
    path = write(TINY.replace("trainer_callbacks:", "trainer_callback:"))
    with caplog.at_level(logging.WARNING, logger="trainer.run_config"):
        trainer = build_trainer(load_config(path), {"output_dir": str(tmp_path)})
    assert not any(isinstance(cb, EventRecorder) for cb in trainer.callback_handler.callbacks)
    assert f"{path}:{line_of(path, 'trainer_callback:')}" in caplog.text
    assert "did you mean 'trainer_callbacks'" in caplog.text


# -- errors: each names the file and the line -------------------------------------------------------------


@pytest.mark.parametrize("tag, expected", [
    ("!singletn:builtins:dict", "unknown tag !singletn:builtins:dict; known tags: !singleton:module:Callable"),
    ("!list:prompts", "unknown tag !list:prompts; write !list or !list:@name"),
    ("!dict:@", "unknown tag !dict:@; write !dict or !dict:@name"),
    ("!variable x", "unknown tag !variable"),
    ("!include other.yaml", "unknown tag !include"),
])
def test_unknown_tag(write, tag, expected):
    path = write(f"""
        a: 1
        b: {tag}
    """)
    with pytest.raises(ConfigError, match=at(path, 2)) as info:
        load_config(path)
    assert expected in str(info.value)


@pytest.mark.parametrize("value, expected", [
    ("!list {x: 1}", "!list needs a sequence"),
    ("!list:@names {x: 1}", "!list needs a sequence"),
    ("!dict [1]", "!dict needs a mapping"),
    ("!dict:@info scalar", "!dict needs a mapping"),
])
def test_tag_on_the_wrong_kind_of_node(write, value, expected):
    path = write(f"""
        a: 1
        b: {value}
    """)
    with pytest.raises(ConfigError, match=at(path, 2) + re.escape(expected)):
        load_config(path)


def test_import_of_a_missing_module(write):
    path = write("""
        # the next line imports nothing that exists
        x: !singleton:no_such_module_fgcfg:Thing {}
    """)
    with pytest.raises(ConfigError, match=at(path, 2) + r"cannot import 'no_such_module_fgcfg' for "
                                         r"!singleton:no_such_module_fgcfg:Thing: No module named"):
        load_config(path)


def test_import_of_a_missing_attribute(write):
    path = write("""
        a: 1
        b: 2
        x: !singleton:trainer.data:NoSuchFactory [1]
    """)
    with pytest.raises(ConfigError, match=at(path, 3) + r"module 'trainer.data' has no attribute 'NoSuchFactory'"):
        load_config(path)


def test_import_of_a_module_that_fails_to_import(write):
    write("x = = 1\n", name="fgcfg_broken_module.py")
    path = write("""
        x: !singleton:fgcfg_broken_module:f []
    """)
    with pytest.raises(ConfigError, match=at(path, 1) + r"importing 'fgcfg_broken_module' .* failed: SyntaxError"):
        load_config(path)


def test_module_beside_the_config_is_importable(write):
    write("def make(x):\n    return ('made', x)\n", name="fgcfg_beside.py")
    config = load_config(write("x: !singleton:fgcfg_beside:make [1]\n"))
    assert config.values["x"] == ("made", 1)


@pytest.mark.parametrize("tag, expected", [
    ("!singleton:builtins", r"!singleton:builtins should name module:Callable"),
    ("!singleton:math:pi", r"math:pi is not callable"),
])
def test_target_that_is_not_a_callable(write, tag, expected):
    path = write(f"""
        a: 1
        x: {tag} []
    """)
    with pytest.raises(ConfigError, match=at(path, 2) + expected):
        load_config(path)


@pytest.mark.parametrize("arguments, expected", [
    ("{a: 1, d: 4}", "got an unexpected keyword argument 'd'"),
    ("{b: 1}", "missing a required argument: 'a'"),
    ("[1, 2, 3]", "too many positional arguments"),
    ("{1: x}", "keyword names must be strings, got [1]"),
])
def test_bad_arguments(write, helpers, arguments, expected):
    path = write(f"""
        a: 1
        b: 2
        x: !singleton:{HELPERS_MODULE}:strict {arguments}
    """)
    with pytest.raises(ConfigError, match=at(path, 3)) as info:
        load_config(path)
    assert expected in str(info.value)


@pytest.mark.parametrize("body, expected", [
    ("args: 5", "args: of fgcfg_test_helpers:record must be a list, got int"),
    ("args: abc", "args: of fgcfg_test_helpers:record must be a list, got str"),
    ("kwargs: [1, 2]", "kwargs: of fgcfg_test_helpers:record must be a mapping, got list"),
])
def test_args_and_kwargs_keys_of_the_wrong_type(write, helpers, body, expected):
    path = write(f"""
        a: 1
        x: !singleton:{HELPERS_MODULE}:record
            {body}
    """)
    with pytest.raises(ConfigError, match=at(path, 2)) as info:
        load_config(path)
    assert expected in str(info.value)


def test_missing_var(write):
    path = write("""
        args:
            run_name: !var run_name
    """)
    with pytest.raises(ConfigError, match=at(path, 2)) as info:
        load_config(path, {"seed": 1})
    message = str(info.value)
    assert "variable 'run_name' was not given (known: seed)" in message
    assert "--var run_name=VALUE" in message


def test_var_without_a_name(write):
    path = write("""
        x: !var
    """)
    with pytest.raises(ConfigError, match=at(path, 1) + r"!var needs a variable name"):
        load_config(path, {"x": 1})


def test_exception_inside_the_factory(write, helpers):
    path = write(f"""
        outer: !singleton:{HELPERS_MODULE}:record
            ok: 1
            inner: !singleton:{HELPERS_MODULE}:boom
                message: kaboom
    """)
    with pytest.raises(ConfigError, match=at(path, 3) + rf"{HELPERS_MODULE}:boom\(...\) failed: RuntimeError: kaboom") \
            as info:
        load_config(path)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original traceback is kept


def test_invalid_training_arguments_in_a_singleton(write):
    path = write("""
        model: 1
        args: !singleton:trainer:TrainingArguments
            logging_strategy: sometimes
    """)
    with pytest.raises(ConfigError, match=at(path, 2)) as info:
        load_config(path)
    assert "logging_strategy='sometimes' is not valid" in str(info.value)


def test_unknown_training_arguments_field(write, tmp_path):
    path = write("""
        model: !singleton:conftest:TinyRegression
        # the arguments
        args:
            max_step: 3
            learning_rat: 0.1
    """)
    config = load_config(path)
    with pytest.raises(ConfigError, match=at(path, 3) + r"unknown TrainingArguments field\(s\)") as info:
        build_trainer(config, {"output_dir": str(tmp_path)})
    message = str(info.value)
    assert "'max_step' (did you mean 'max_steps'?)" in message
    assert "'learning_rat' (did you mean 'learning_rate'?)" in message


def test_invalid_training_arguments_value(write, tmp_path):
    path = write("""
        model: !singleton:conftest:TinyRegression

        args:
            logging_strategy: sometimes
    """)
    config = load_config(path)
    with pytest.raises(ConfigError, match=at(path, 3)) as info:
        build_trainer(config, {"output_dir": str(tmp_path)})
    assert "logging_strategy='sometimes' is not valid; choose one of 'no', 'steps', 'epoch'" in str(info.value)


def test_inconsistent_training_arguments(write, tmp_path):
    path = write("""
        model: !singleton:conftest:TinyRegression
        args:
            eval_strategy: steps
            eval_steps: 10
            save_steps: 15
            load_best_model_at_end: true
    """)
    with pytest.raises(ConfigError, match=at(path, 2) + r"save_steps=15: must be a multiple of eval_steps=10"):
        build_trainer(load_config(path), {"output_dir": str(tmp_path)})


@pytest.mark.parametrize("text, line, expected", [
    ("a: 1\n# comment\nb: x: y\n", 3, "mapping values are not allowed here"),
    ("a: 1\nb: *nowhere\n", 2, "found undefined alias 'nowhere'"),
    ("a: 1\nb:\n  c: 1\n d: 2\n", 4, "expected <block end>"),
    ("a: 1\n---\nb: 2\n", 2, "but found another document"),
    ("a: 1\nb: \"bell \x07\"\n", 2, "unacceptable character #x0007"),
])
def test_yaml_syntax_error(tmp_path, text, line, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=at(path, line) + "invalid YAML: ") as info:
        load_config(path)
    assert expected in str(info.value)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("a: 1\nname: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=at(path, 2) + "not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize("text, line", [
    ("# a list is not a config\n\n- a\n- b\n", 3),
    ("just a string\n", 1),
])
def test_top_level_must_be_a_mapping(tmp_path, text, line):
    path = tmp_path / "top.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=at(path, line) + "the top level must be a mapping of keys"):
        load_config(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{empty}: the file is empty")):
        load_config(empty)
    with pytest.raises(ConfigError, match="^" + re.escape(f"cannot read config {tmp_path / 'absent.yaml'}")):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:{module}.touch",
    "!!python/object/new:{module}.touch",
    "!!python/name:{module}.touch",
    "!!python/object:{module}.Made",
])
def test_python_tags_are_refused_and_nothing_is_evaluated(write, helpers, tmp_path, tag):
    marker = tmp_path / "evaluated"
    path = write(f"""
        safe: 1
        x: {tag.format(module=HELPERS_MODULE)} [{marker}]
    """)
    with pytest.raises(ConfigError, match=at(path, 2) + r"unknown tag tag:yaml.org,2002:python/"):
        load_config(path)
    assert not marker.exists()
    assert helpers.MADE == []


def test_build_trainer_errors(write, tmp_path):
    no_model = write("args: {max_steps: 1}\n", name="no_model.yaml")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{no_model}: the config has no `model`")):
        build_trainer(load_config(no_model))

    both = write("model: !singleton:conftest:TinyRegression\nprocessing_class: 1\ntokenizer: 2\n", name="both.yaml")
    with pytest.raises(ConfigError, match=at(both, 3) + "give processing_class or tokenizer, not both"):
        build_trainer(load_config(both))

    not_list = write("model: !singleton:conftest:TinyRegression\ntrainer_callbacks: {a: 1}\n", name="not_list.yaml")
    with pytest.raises(ConfigError, match=at(not_list, 2) + "trainer_callbacks must be a list"):
        build_trainer(load_config(not_list))

    bad_args = write("model: !singleton:conftest:TinyRegression\nargs: [1]\n", name="bad_args.yaml")
    with pytest.raises(ConfigError, match=at(bad_args, 2) + "args must be a mapping of TrainingArguments fields"):
        build_trainer(load_config(bad_args))

    no_eval = write("model: !singleton:conftest:TinyRegression\nargs: {eval_strategy: steps, eval_steps: 1}\n",
                    name="no_eval.yaml")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{no_eval}: eval_strategy='steps' needs an eval_dataset")):
        build_trainer(load_config(no_eval), {"output_dir": str(tmp_path), "use_cpu": True})


# -- the example configs -----------------------------------------------------------------------------------


def _example_variables(*argv: str) -> dict:
    """Variables exactly as `fg-train CONFIG --var ...` parses them."""
    return dict(fg_train_parser().parse_args([str(CUSTOM), *argv]).var)


def test_custom_callbacks_example_loads_and_builds(tmp_path):
    config = load_config(CUSTOM, _example_variables("--var", "run_name=trial-1"))
    values = config.values
    assert values["run_name"] == "trial-1" and values["args"]["run_name"] == "trial-1"
    assert set(config.named) == {"experiment_info", "trainer_callbacks"}

    threshold, timer, experiment = values["trainer_callbacks"]
    assert type(threshold).__name__ == "LossThresholdCallback" and threshold.threshold > 0
    assert timer is values["step_timer"] and experiment.timer is timer  # one anchor, one instance
    assert experiment.filename == "experiment.jsonl"
    assert experiment.meta == {**config.named["experiment_info"], "run_name": "trial-1"}  # merged with <<

    trainer = build_trainer(config, {"output_dir": str(tmp_path), "use_cpu": True})
    assert trainer.args.run_name == "trial-1"
    assert trainer.processing_class is values["processing_class"]
    assert trainer.model.config.vocab_size == trainer.processing_class.vocab_size
    callbacks = trainer.callback_handler.callbacks
    for cb in (threshold, timer, experiment):
        assert sum(c is cb for c in callbacks) == 1


def test_custom_callbacks_example_needs_run_name():
    with pytest.raises(ConfigError, match=at(CUSTOM, line_of(CUSTOM, "!var run_name")) +
                       r"variable 'run_name' was not given"):
        load_config(CUSTOM)


def test_early_stopping_example_loads_and_builds(tmp_path):
    config = load_config(EARLY_STOPPING)
    trainer = build_trainer(config, {"output_dir": str(tmp_path), "use_cpu": True})
    args = trainer.args
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.load_best_model_at_end is True
    assert args.eval_strategy == "steps" and args.save_steps % args.eval_steps == 0
    stoppers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)]
    assert stoppers == config.named["trainer_callbacks"] and stoppers[0].early_stopping_patience >= 1


def test_custom_callbacks_example_trains(tmp_path, capsys):
    config = load_config(CUSTOM, {"run_name": "smoke"})
    trainer = build_trainer(config, {"max_steps": 3, "output_dir": str(tmp_path), "use_cpu": True})
    result = trainer.train()
    assert result.global_step == 3 and trainer.state.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, positive

    threshold, timer, experiment = config.values["trainer_callbacks"]
    assert threshold.stopped_at is None  # a 3-step loss is far above the threshold
    assert len(timer.step_times) == 3 and timer.mean_step_time > 0
    assert "StepTimerCallback: mean step time" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "experiment.jsonl").read_text().splitlines()]
    assert records[0]["meta"]["run_name"] == "smoke" and records[0]["max_steps"] == 3
    assert records[1]["step"] == 1 and "loss" in records[1]  # logging_first_step
    assert records[-1]["end"] is True and records[-1]["mean_step_time"] == pytest.approx(timer.mean_step_time)


def test_early_stopping_example_trains_and_keeps_the_best(tmp_path):
    # Evaluate and save every step (smaller batches, to stay fast): two evaluations, each with a checkpoint.
    trainer = build_trainer(load_config(EARLY_STOPPING),
                            {"max_steps": 2, "output_dir": str(tmp_path), "use_cpu": True, "eval_steps": 1,
                             "save_steps": 1, "per_device_train_batch_size": 8, "disable_tqdm": True})
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert trainer.state.global_step == 2 and sorted(evals) == [1, 2]
    best_step = min(evals, key=evals.get)
    assert trainer.state.best_metric == evals[best_step]
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    assert (tmp_path / f"checkpoint-{best_step}").is_dir()


def test_fg_train_runs_the_custom_example_with_var(tmp_path, capsys):
    out = tmp_path / "run"
    rc = fg_train([str(CUSTOM), "--var", "run_name=cli-run", "--max-steps", "2", "--device", "cpu",
                   "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    assert "Done: 2 steps" in capsys.readouterr().out
    meta = json.loads((out / "experiment.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["run_name"] == "cli-run"


def test_fg_train_reports_a_missing_var(capsys):
    assert fg_train([str(CUSTOM), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"fg-train: error: {CUSTOM}:{line_of(CUSTOM, '!var run_name')}: variable 'run_name' was not given" in err


def test_loss_threshold_callback_of_the_example_stops_training(write, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    path = write(TINY.replace("        - *recorder", "        - *recorder\n"
                              "        - !singleton:my_callbacks:LossThresholdCallback {threshold: 1.0e9}"))
    config = load_config(path)
    trainer = build_trainer(config, {"output_dir": str(tmp_path), "logging_steps": 1, "eval_strategy": "no"})
    trainer.train()
    stopper = config.values["trainer_callbacks"][1]
    assert stopper.stopped_at == 1 and trainer.state.global_step == 1  # max_steps is 5

    bad = write("cb: !singleton:my_callbacks:LossThresholdCallback {threshold: 0}\n", name="bad.yaml")
    with pytest.raises(ConfigError, match=at(bad, 1) + r"my_callbacks:LossThresholdCallback\(...\) failed: "
                                                     r"ValueError: threshold=0: must be > 0"):
        load_config(bad)
