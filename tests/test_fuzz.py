"""Bad input, fuzzed (issue 11, section 6): property-based tests with Hypothesis.

Every input below either loads, or ends with gfnlm's one-line error (a :class:`GFNLMError`;
on the command line ``error: ...`` on stderr and exit status 2), never another exception:

1. the config parser: YAML files and ``--field value`` / ``--field=value`` / ``--task_args.key
   value`` overrides, through :meth:`GFNConfig.from_yaml` and through ``gfnlm train``;
2. every data loader: the generic prompt files of :mod:`gfnlm.data` (.jsonl, .json, .csv, .txt),
   arithmetic JSON, SUBJ JSONL, story JSONL and continuation prompt files, each through its task's
   ``dataset()``, plus ``gfnlm train --dataset FILE``;
3. checkpoint loading: a real (tiny) checkpoint, copied and damaged file by file, loaded through
   :func:`gfnlm.trainer.load_trained`, ``gfnlm sample`` and ``GFNTrainer.train(resume_from_checkpoint=)``.

Inputs are valid and damaged alike (truncated, wrongly typed, empty, random bytes, not UTF-8).
The budget is small and derandomised, so CI runs the same examples every time.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import hypothesis
import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, currently_in_test_context, example, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_lm, make_tiny_tokenizer, save_tiny_lm
from test_rng_task import digit_tokenizer
import gfnlm.models
from gfnlm.cli import main
from gfnlm.config import GFNConfig
from gfnlm.data import load_rows
from gfnlm.errors import GFNLMError, ModelLoadError
from gfnlm.rewards import PrefixRuleReward
from gfnlm.tasks import REGISTRY, get_task_class
from gfnlm.tasks.arithmetic import ArithmeticTask, load_questions
from gfnlm.tasks.continuation import ContinuationTask, load_prompts
from gfnlm.tasks.infilling import InfillingTask, load_stories
from gfnlm.tasks.subjectivity import SubjectivityTask, load_examples
from gfnlm.trainer import GFNTrainer, load_trained

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


def fuzz(max_examples: int, **kwargs) -> settings:
    """The shared settings with this test's budget of examples."""
    return settings(FUZZ, max_examples=max_examples, **kwargs)


def event(name: str) -> None:
    """Count an outcome in ``--hypothesis-show-statistics`` (outside Hypothesis: nothing)."""
    if currently_in_test_context():
        hypothesis.event(name)


class Accepted(Exception):
    """Raised by a patched step once the input under test was accepted (stops before real work)."""


def loads_or_one_line_error(fn, *args, **kwargs):
    """``fn(...)``'s result, or the GFNLMError it raised (checked to be one non-empty line).
    Any other exception propagates and fails the test."""
    try:
        result = fn(*args, **kwargs)
    except GFNLMError as e:
        msg = str(e)
        assert msg.strip(), f"empty {type(e).__name__} message"
        assert len(msg.splitlines()) == 1, f"{type(e).__name__} message is not one line: {msg!r}"
        event(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}")
        return e
    event(f"{getattr(fn, '__name__', fn)}: loaded")
    return result


def run_cli(argv: list[str], capsys) -> str:
    """Run ``gfnlm`` in-process: 'accepted' (a patched step raised Accepted), 'ok' (status 0) or
    'error' (status 2 with exactly one ``error:`` line on stderr); never a traceback."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except Accepted:
        event("cli: accepted")
        return "accepted"
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if rc == 0:
        event("cli: ok")
        return "ok"
    assert rc == 2, (rc, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], f"the error message is not one line: {err!r}"
    assert len(errors[0]) > len("error: "), err
    event("cli: error")
    return "error"


# ----------------------------------------------------------------------------------------------
# shared strategies
# ----------------------------------------------------------------------------------------------

TEXT = st.text(max_size=24)
WORDS = TEXT.filter(str.strip)  # text that is not blank


@st.composite
def mostly(draw, valid, *invalid):
    """A draw of ``valid`` about four times in five, else of one of ``invalid``."""
    return draw(valid) if draw(st.integers(0, 4)) else draw(st.one_of(*invalid))


JSON_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUE = st.recursive(JSON_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=8)
HUGE_DIGITS = "1" + "0" * 5000  # past Python's 4300-digit int() limit: int(), json and YAML raise ValueError


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` as it is (3 times in 7), or damaged: truncated, bytes inserted, not UTF-8, a BOM, ..."""
    kind = draw(st.sampled_from(["intact"] * 6 + ["truncate", "insert", "bad_utf8", "utf16", "bom", "nul",
                                                  "random", "empty"]))
    pos = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if kind == "bad_utf8":
        return data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80abc"])) + data[pos:]
    if kind == "utf16":
        return data.decode("utf-8", "replace").encode("utf-16")
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    if kind == "nul":
        return data[:pos] + b"\x00" + data[pos + 1:]
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    return data


def json_lines(rows: list) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


# ----------------------------------------------------------------------------------------------
# 1. the config parser
# ----------------------------------------------------------------------------------------------

FIELDS = GFNConfig.field_names()
_HINTS = __import__("typing").get_type_hints(GFNConfig)
TASK_NAME_LIST = [*REGISTRY, "", "nope", ":X", ".x:Y", "x:", "json:dumps", "os:path", "gfnlm.tasks:Task",
                  "gfnlm.tasks.rng:Nope", "gfnlm.no_such_module:X", "rng\nrng"]
TASK_NAMES = st.sampled_from([None, *TASK_NAME_LIST])
IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
TASK_ARG_KEYS = st.sampled_from(["eval_samples", "seed_buffer", "data_dir", "prompt", "train_size", "test_files",
                                 "valid_prompts", "max_operands", "a", "b", "restrict_vocab"]) | IDENT


CHOICES = {"loss_type": ["modified_subtb", "tb", "vargrad", "modified_db"], "log_z": ["auto", "none", "scalar", "prompt"],
           "chat_template": ["auto", "always", "never"], "lr_scheduler_type": ["linear", "constant", "cosine"],
           "mixed_precision": ["no", "bf16"]}


def field_value(name: str):
    """A value of the field's own type (mostly), or anything JSON/YAML can hold."""
    if name == "task":
        return TASK_NAMES
    if name == "task_args":
        return mostly(st.dictionaries(TASK_ARG_KEYS, JSON_SCALAR | st.lists(JSON_SCALAR, max_size=3), max_size=3), JSON_VALUE)
    hint = str(_HINTS[name])
    if name in CHOICES:
        valid, typed = st.sampled_from(CHOICES[name]), TEXT
    elif "float" in hint:
        valid, typed = st.floats(0.01, 1.0), st.floats() | st.integers(-10, 10**6) | st.sampled_from([10**400, -(10**400)])
    elif "bool" in hint:
        valid = typed = st.booleans()
    elif "int" in hint:
        valid, typed = st.integers(1, 100), st.integers(-5, 10**6) | st.sampled_from([10**40, 2**63])
    elif "list" in hint:
        valid = typed = st.lists(TEXT | st.integers(), max_size=3)
    else:
        valid, typed = WORDS, TEXT
    return mostly(valid, typed, JSON_VALUE)


@st.composite
def config_mapping(draw) -> dict:
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    out = {n: draw(field_value(n)) for n in names}
    if not draw(st.integers(0, 3)):  # unknown or misspelt fields, and keys of other types
        out[draw(IDENT | st.sampled_from([f[:-1] for f in FIELDS]) | st.integers() | st.none() | st.booleans())] = draw(JSON_SCALAR)
    return out


YAML_SNIPPETS = st.sampled_from([
    "task: rng", "max_steps: 3", "learning_rate: 1e-3", "task_args:\n  eval_samples: 4", "task_args: {1: 2}",
    "task_args: 5", "task: 5", "task: [rng]", "task: {a: 1}", "task: ':X'", "task: '.x:Y'", "task: 'os:path'",
    "seed: 2001-13-45", "output_dir: 2001-02-29", "seed: !!float abc", "seed: !!int x", "seed: !!bool x",
    "seed: !!timestamp x", "seed: !!binary '@@'", "seed: !!set {1}", "lora_target_modules: !!set {q: null}",
    "? [a]\n: 1", "null: 1", "1: 2", "true: 3", "x: !!python/object:os.system {}", "a: &a [*a]", "\tmax_steps: 1",
    "max_steps: 1\nmax_steps: 2", "---\nmax_steps: 1\n---\nseed: 2", "[" * 600, "{a: " * 50,
    f"learning_rate: {10 ** 400}", f"seed: {HUGE_DIGITS}", "stop_tokens: [[1, 2]]", "report_to: 5", "report_to: null",
    "reward_weights: [1, 'a']", "lora_target_modules: [q_proj]", "loss_type: \"tb\\nx\"", "log_z: \"a\\u2028b\"",
    "chat_template: \"x\\x85y\"", "\"max\\nsteps\": 1", "dataset: 5", "max_steps: .nan", "learning_rate: .inf",
    "learning_rate: -.inf", "epsilon: .nan", "reward_temperature_end: 0", "init_from: ''",
])


@st.composite
def config_yaml(draw) -> bytes:
    kind = draw(st.sampled_from(["mapping"] * 4 + ["snippets"] * 3 + ["text"]))
    if kind == "mapping":
        text = yaml.safe_dump(draw(config_mapping()), allow_unicode=draw(st.booleans()), sort_keys=False)
    elif kind == "snippets":
        text = "\n".join(draw(st.lists(YAML_SNIPPETS, min_size=1, max_size=3)))
    else:
        text = draw(st.text(max_size=60))
    return draw(damaged(text.encode("utf-8")))


OVERRIDE_KEYS = (st.sampled_from(FIELDS) | st.sampled_from([f.replace("_", "-") for f in FIELDS])
                 | st.sampled_from([f[:-1] for f in FIELDS]) | st.builds("task_args.{}".format, TASK_ARG_KEYS)
                 | st.builds("{}.{}".format, st.sampled_from(FIELDS), IDENT) | st.builds("{}.{}.{}".format, IDENT, IDENT, IDENT)
                 | IDENT | st.sampled_from(["", ".", "task_args.", "=", "-"]))
OVERRIDE_VALUES = (st.sampled_from(["1", "-1", "0", "0.5", "1e-3", "-1e-3", "1e999", "true", "false", "null", "~", "[]",
                                    "[a, b]", "{a: 1}", "{", "[", "'", "\"", "2001-13-45", "!!float abc", "!!bool x",
                                    "!!timestamp x", "!!set {1}", "!!python/name:os.system", "&a [*a]", ".nan", "",
                                    "rng", "arithmetic", "os:path", ":X", "modified_subtb", "tb", HUGE_DIGITS,
                                    str(10 ** 400), "[" * 600])
                   | st.text(max_size=16) | st.integers().map(str) | st.floats().map(str))


@st.composite
def override_args(draw, cli: bool = False) -> list[str]:
    """``--key value`` / ``--key=value`` pairs, bare words and dangling keys. ``cli``: only what
    argparse hands on to the overrides (no abbreviation of gfnlm train's own options, no -h)."""
    out: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 2)):  # a field and a value of its type (as JSON, which YAML reads)
            key = draw(st.sampled_from(FIELDS))
            value = json.dumps(draw(field_value(key)), ensure_ascii=False)
            form = draw(st.sampled_from(["pair", "equals"]))
        else:
            key, value = draw(OVERRIDE_KEYS), draw(OVERRIDE_VALUES)
            form = draw(st.sampled_from(["pair", "pair", "equals", "equals", "bare", "single_dash", "dangling"]))
        if cli:
            head = ("--" + key).split("=", 1)[0]
            assume(not any(opt.startswith(head) for opt in ("--config", "--task", "--resume", "--help")))
            if form == "pair":  # a separate value that argparse would take for an option
                assume(not value.startswith("-") or value.lstrip("-").replace(".", "", 1).isdigit())
            if form == "bare":
                assume(not key.startswith("-"))
            if form == "single_dash":
                assume(not ("-" + key).startswith("-h"))
        if form == "pair":
            out += ["--" + key, value]
        elif form == "equals":
            out.append(f"--{key}={value}")
        elif form == "bare":
            out.append(key)
        elif form == "single_dash":
            out += ["-" + key, value]
        else:
            out.append("--" + key)
            break
    return out


def check_task(config: GFNConfig):
    """What ``gfnlm train`` does with a loaded config before it loads a model: resolve the task and
    validate its ``task_args``."""
    if config.task is not None:
        get_task_class(config.task)(config.task_args)


@fuzz(250)
@given(yaml_bytes=config_yaml(), overrides=override_args())
@example(yaml_bytes=b"", overrides=[])
@example(yaml_bytes=b"max_steps: 3\ntask: rng\n", overrides=["--task_args.eval_samples", "4", "--task_args.eval_samples=5"])
@example(yaml_bytes=b"task_args: {prompt: x}\n", overrides=["--task_args.restrict_vocab", "false"])
@example(yaml_bytes=b"\xff\xfe", overrides=[])
@example(yaml_bytes=b"seed: 2001-13-45\n", overrides=[])
@example(yaml_bytes=b"seed: !!bool x\n", overrides=[])
@example(yaml_bytes=b"[" * 600, overrides=[])
@example(yaml_bytes=f"learning_rate: {10 ** 400}".encode(), overrides=[])
@example(yaml_bytes=b"1: 2\nnull: 3\n", overrides=[])
@example(yaml_bytes=b"task: 5\n", overrides=[])
@example(yaml_bytes=b"task: os:path\n", overrides=[])
@example(yaml_bytes=b"", overrides=["--output_dir", "2001-13-45", "--seed", "!!bool x"])
@example(yaml_bytes=b"", overrides=["--seed", HUGE_DIGITS])
@example(yaml_bytes=b"", overrides=["--task_args", "5", "--task_args.x", "1"])
@example(yaml_bytes=b"", overrides=["--task", "rng", "--task_args.max_operands.x", "1"])
@example(yaml_bytes=b"", overrides=["--loss_type", "\"a\\nb\""])
def test_config_yaml_and_overrides(tmp_path, yaml_bytes, overrides):
    path = tmp_path / "config.yaml"
    path.write_bytes(yaml_bytes)
    config = loads_or_one_line_error(GFNConfig.from_yaml, path, overrides)
    if isinstance(config, GFNConfig):
        loads_or_one_line_error(check_task, config)


@pytest.fixture
def no_model_loads(monkeypatch):
    """``gfnlm train`` stops with Accepted where it would load the model: the config was accepted."""
    def refuse(*args, **kwargs):
        raise Accepted()

    monkeypatch.setattr(gfnlm.models, "load_model", refuse)


@fuzz(100)
@given(yaml_bytes=st.none() | config_yaml(), task=st.none() | st.sampled_from([t for t in TASK_NAME_LIST if t]),
       overrides=override_args(cli=True))
@example(yaml_bytes=None, task="rng", overrides=["--max_steps", "2"])
@example(yaml_bytes=b"task: rng\n", task=None, overrides=["--task_args.nope", "1"])
@example(yaml_bytes=b"\xff\xfe\x00", task=None, overrides=[])
@example(yaml_bytes=b"task: 5\n", task=None, overrides=[])
@example(yaml_bytes=None, task="os:path", overrides=[])
@example(yaml_bytes=None, task=":X", overrides=[])
@example(yaml_bytes=None, task=".x:Y", overrides=[])
@example(yaml_bytes=None, task="rng", overrides=["--task_args", "5", "--task_args.x", "1"])
@example(yaml_bytes=None, task="rng", overrides=["--learning_rate", str(10 ** 400)])
@example(yaml_bytes=None, task="rng", overrides=["--loss_type=\"a\\nb\""])
def test_cli_train_config(tmp_path, capsys, no_model_loads, yaml_bytes, task, overrides):
    argv = ["train"]
    if yaml_bytes is not None:
        (tmp_path / "c.yaml").write_bytes(yaml_bytes)
        argv += ["--config", tmp_path / "c.yaml"]
    if task is not None:
        argv += ["--task", task]
    argv += ["--output_dir", tmp_path / "run", "--report_to", "[]", *overrides]
    run_cli(argv, capsys)


# ----------------------------------------------------------------------------------------------
# 2. the data loaders
# ----------------------------------------------------------------------------------------------

@st.composite
def prompt_rows(draw, column: str = "prompt") -> list:
    row = mostly(st.fixed_dictionaries({column: WORDS}, optional={"x": JSON_SCALAR}) | WORDS,
                 st.fixed_dictionaries({column: TEXT}), st.fixed_dictionaries({column: JSON_VALUE}),
                 st.fixed_dictionaries({"other": TEXT}), JSON_VALUE)
    return draw(st.lists(row, max_size=5))


def csv_text(rows: list, header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(r if isinstance(r, list) else [r])
    return buf.getvalue()


@st.composite
def prompt_file(draw, column: str = "prompt") -> tuple[str, bytes]:
    """(suffix, bytes) of a prompt file in any of the generic formats."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt", "", ".JSONL", ".yaml", ".parquet"]))
    kind = suffix.lower()
    if kind == ".jsonl":
        text = json_lines(draw(prompt_rows(column)))
    elif kind == ".json":
        text = json.dumps(draw(prompt_rows(column) | JSON_VALUE))
    elif kind == ".csv":
        header = draw(st.lists(st.sampled_from([column, "prompt", "x", "", "a,b", "\n"]), min_size=1, max_size=3))
        rows = draw(st.lists(st.lists(TEXT, max_size=4), max_size=4))  # ragged rows: missing and extra fields
        text = csv_text(rows, header)
    else:
        text = "\n".join(draw(st.lists(TEXT, max_size=5)))
    return suffix, draw(damaged(text.encode("utf-8")))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@fuzz(250)
@given(file=prompt_file(), column=st.sampled_from(["prompt", "prompt", "text", "str_query", "x"]))
@example(file=(".csv", b"prompt\na,b,c\n"), column="x")  # an extra field: csv's key None
@example(file=(".csv", b"\xff\xfeprompt\n"), column="prompt")
@example(file=(".jsonl", b'{"prompt": ' + HUGE_DIGITS.encode() + b"}\n"), column="prompt")
@example(file=(".json", b"[" * 100000), column="prompt")
@example(file=(".txt", "caf\xe9\n".encode("latin-1")), column="prompt")
def test_generic_prompt_files(tmp_path, file, column):
    suffix, data = file
    rows = loads_or_one_line_error(load_rows, write(tmp_path, "data" + suffix, data), column)
    if isinstance(rows, list):
        assert rows and all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)


@st.composite
def arithmetic_rows(draw) -> list:
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        nums = draw(st.lists(st.integers(0, 9), min_size=2, max_size=5))
        ops = draw(st.lists(st.sampled_from("+-"), min_size=len(nums) - 1, max_size=len(nums) - 1))
        expr, value = str(nums[0]), nums[0]
        for op, n in zip(ops, nums[1:]):
            expr, value = f"{expr} {op} {n}", value + n if op == "+" else value - n
        row = {"str_query": f"Question: {expr} = ? Answer:", "num_sol": value,
               "str_rationale": f"{expr} =", "str_sol": f". The answer is {value}."}
        how = draw(st.sampled_from(["ok"] * 5 + ["wrong_sol", "sol_type", "query", "drop", "json"]))
        if how == "wrong_sol":
            row["num_sol"] = value + draw(st.integers(1, 5))
        elif how == "sol_type":
            row["num_sol"] = draw(st.sampled_from([str(value), float(value), value + 0.5, f"{value}.0", "x", None, [value],
                                                   True, HUGE_DIGITS, 1e300]) | JSON_VALUE)
        elif how == "query":
            row["str_query"] = draw(st.sampled_from([f"Question: {expr} = ?", f"Question: {HUGE_DIGITS} = ? Answer:",
                                                     f"Question: {expr} + = ? Answer:", "", " "]) | JSON_VALUE)
        elif how == "drop":
            del row[draw(st.sampled_from(sorted(row)))]
        elif how == "json":
            row = draw(JSON_VALUE)
        rows.append(row)
    return rows


TEST_FILES = st.sampled_from(["3:{f}", "3:{f},4:{f}", "{f}", "3:{f},", "", ":", "3:", "3:{f}:x", "a:b"])


@fuzz(150)
@given(rows=arithmetic_rows(), data=st.data(), test_files=TEST_FILES,
       suffix=st.sampled_from([".json", ".json", ".json", ".JSON", ".jsonl", ".txt"]))
@example(rows=[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": "x"}], data=None, test_files="3:{f}", suffix=".json")
@example(rows=[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": None}], data=None, test_files="3:{f}", suffix=".json")
@example(rows=[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 1e300}], data=None, test_files="3:{f}", suffix=".json")
@example(rows=[{"str_query": f"Question: {HUGE_DIGITS} + 2 = ? Answer:", "num_sol": 3}], data=None, test_files="3:{f}", suffix=".json")
@example(rows=[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3}], data=None, test_files="{f}", suffix=".json")
def test_arithmetic_questions(tmp_path, rows, data, test_files, suffix):
    raw = json.dumps(rows).encode()
    raw = data.draw(damaged(raw)) if data is not None else raw
    path = write(tmp_path, "questions" + suffix, raw)
    loaded = loads_or_one_line_error(load_questions, path)
    if isinstance(loaded, list):
        assert all(isinstance(r["num_sol"], int) for r in loaded)
    task = ArithmeticTask({"data_dir": str(tmp_path), "supervised_file": str(path), "pool_file": str(path),
                           "test_files": test_files.format(f=path)})
    loads_or_one_line_error(task.dataset)
    loads_or_one_line_error(task.test_sets)


@st.composite
def subj_rows(draw) -> list:
    label = mostly(st.sampled_from([0, 1, "objective", "subjective", " Subjective ", 1.0]), JSON_VALUE)
    row = mostly(st.fixed_dictionaries({"text": WORDS, "label": label}),
                 st.fixed_dictionaries({"text": TEXT | JSON_VALUE, "label": label}), st.fixed_dictionaries({"label": label}),
                 st.fixed_dictionaries({"text": TEXT}), JSON_VALUE)
    return draw(st.lists(row, max_size=5))


@fuzz(150)
@given(rows=subj_rows(), data=st.data(), suffix=st.sampled_from([".jsonl", ".jsonl", ".jsonl", ".json", ".csv"]))
@example(rows=[{"text": "a", "label": 1}], data=None, suffix=".jsonl")
def test_subjectivity_examples(tmp_path, rows, data, suffix):
    text = json_lines(rows) if suffix == ".jsonl" else json.dumps(rows) if suffix == ".json" else csv_text(
        [[str(r.get("text")), str(r.get("label"))] if isinstance(r, dict) else [str(r)] for r in rows], ["text", "label"])
    raw = data.draw(damaged(text.encode())) if data is not None else text.encode()
    path = write(tmp_path, "train" + suffix, raw)
    loaded = loads_or_one_line_error(load_examples, path)
    if isinstance(loaded, list):
        assert all(r["label"] in (0, 1) and r["text"] for r in loaded)
    loads_or_one_line_error(SubjectivityTask({"data_dir": str(tmp_path), "train_file": str(path)}).dataset)


@st.composite
def story_rows(draw) -> list:
    sentence = mostly(WORDS | st.just("He went home."), TEXT)
    row = mostly(
        st.fixed_dictionaries({"sentences": st.lists(sentence, min_size=5, max_size=5)}, optional={"id": TEXT}),
        st.fixed_dictionaries({"sentences": st.lists(sentence, max_size=7) | JSON_VALUE}),
        st.fixed_dictionaries({"beginning": sentence, "ending": sentence}, optional={"middle": sentence | JSON_VALUE,
                                                                                     "id": JSON_VALUE}),
        st.fixed_dictionaries({"beginning": JSON_VALUE, "ending": JSON_VALUE}),
        st.fixed_dictionaries({"beginning": sentence}),
        JSON_VALUE)
    return draw(st.lists(row, max_size=5))


@fuzz(150)
@given(rows=story_rows(), data=st.data(), sizes=mostly(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(1, 10)),
                                                     st.tuples(st.integers(-1, 3), st.integers(-1, 3), st.integers(-1, 10))))
@example(rows=[{"sentences": ["A.", "B.", "C.", "D.", "E."]}] * 3, data=None, sizes=(1, 0, 5))
def test_story_files(tmp_path, rows, data, sizes):
    text = json_lines(rows)
    raw = data.draw(damaged(text.encode())) if data is not None else text.encode()
    path = write(tmp_path, "stories.jsonl", raw)
    loaded = loads_or_one_line_error(load_stories, path)
    if isinstance(loaded, list):
        assert all(isinstance(r["prompt"], str) and r["beginning"] and r["ending"] for r in loaded)
    test, valid, train = sizes
    task = InfillingTask({"data_file": str(path), "test_stories": test, "valid_stories": valid, "train_stories": train})
    loads_or_one_line_error(task.dataset)


@fuzz(100)
@given(lines=st.lists(TEXT, max_size=6), data=st.data(),
       sizes=mostly(st.tuples(st.integers(0, 1), st.integers(1, 5)), st.tuples(st.integers(-1, 3), st.integers(-1, 5))))
def test_continuation_prompt_files(tmp_path, lines, data, sizes):
    path = write(tmp_path, "prompts.txt", data.draw(damaged("\n".join(lines).encode())))
    loaded = loads_or_one_line_error(load_prompts, path)
    if isinstance(loaded, list):
        assert loaded and all(p.strip() for p in loaded)
    task = ContinuationTask({"data_file": str(path), "valid_prompts": sizes[0], "train_prompts": sizes[1]})
    loads_or_one_line_error(task.dataset)


@pytest.fixture(scope="module")
def digit_model_dir(tmp_path_factory):
    tok = digit_tokenizer(extra=("The", "following"))
    return save_tiny_lm(tmp_path_factory.mktemp("digits") / "tiny", tok, max_positions=64)


@fuzz(20)
@given(file=prompt_file())
@example(file=(".jsonl", b'{"prompt": "a"}\n{"prompt": \n'))
@example(file=(".txt", b"\xff\xfe1\x002\x00"))
def test_cli_train_dataset_file(tmp_path, capsys, monkeypatch, digit_model_dir, file):
    """``gfnlm train --dataset FILE``: a one-line error, or training would start (stopped there)."""
    def stop(self, *args, **kwargs):
        raise Accepted()

    monkeypatch.setattr(GFNTrainer, "train", stop)
    suffix, data = file
    path = write(tmp_path, "prompts" + suffix, data)
    run_cli(["train", "--task", "rng", "--model", digit_model_dir, "--dataset", path, "--max_steps", "1",
             "--report_to", "[]", "--chat_template", "never", "--task_args.seed_buffer", "false",
             "--disable_tqdm", "true", "--output_dir", tmp_path / "run"], capsys)


# ----------------------------------------------------------------------------------------------
# 3. checkpoint loading
# ----------------------------------------------------------------------------------------------
# The checkpoint format is changing (Accelerate's save_state): these tests know only the public
# paths (load_trained, gfnlm sample, train(resume_from_checkpoint=...)), the folder name
# output_dir/checkpoint-<step>, and damage whatever files the folder holds.

CKPT_STEPS = 2


def rule(prompt: str, text: str) -> float:
    return text.split().count("a") - 0.1 * len(text.split())


def ckpt_trainer(model_dir: Path, output_dir: Path) -> GFNTrainer:
    tok = make_tiny_tokenizer()
    config = GFNConfig(model=str(model_dir), use_peft=True, lora_r=2, lora_alpha=4, max_new_tokens=3,
                       allowed_tokens=["a", "b", "c"], chat_template="never", report_to=[], disable_tqdm=True,
                       samples_per_prompt=4, prompts_per_step=1, max_steps=CKPT_STEPS, save_steps=0,
                       output_dir=str(output_dir), seed=0)
    return GFNTrainer(make_tiny_lm(vocab_size=len(tok), max_positions=64), PrefixRuleReward(rule), args=config,
                      train_dataset=["<s>", "<s> a"], processing_class=tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(model folder, checkpoint folder) of a tiny run of CKPT_STEPS steps, made once."""
    root = tmp_path_factory.mktemp("ckpt")
    model_dir = save_tiny_lm(root / "model", make_tiny_tokenizer(), max_positions=64)
    trainer = ckpt_trainer(model_dir, root / "run")
    trainer.train()
    folder = root / "run" / f"checkpoint-{trainer.step}"
    assert folder.is_dir() and any(folder.iterdir())
    return model_dir, folder


@pytest.fixture
def only_tiny_model(monkeypatch, checkpoint):
    """A damaged config may name another model (e.g. the default SmolLM2): refuse to load it, as
    a missing model would be (ModelLoadError), instead of loading 135M parameters per example."""
    model_dir, _ = checkpoint
    real = gfnlm.models.load_model

    def guarded(name_or_path=None, *args, **kwargs):
        if str(name_or_path) != str(model_dir):
            raise ModelLoadError(f"test: model {str(name_or_path)!r} is not the tiny test model")
        return real(name_or_path, *args, **kwargs)

    monkeypatch.setattr(gfnlm.models, "load_model", guarded)


def copy_checkpoint(src: Path, dest_root: Path) -> Path:
    if dest_root.exists():
        shutil.rmtree(dest_root)
    dest = dest_root / src.name
    shutil.copytree(src, dest)
    return dest


@st.composite
def damage(draw, folder: Path) -> list[tuple[str, str]]:
    """Damage one or two of the files (or sub-folders) ``folder`` holds; returns what was done."""
    entries = sorted(p for p in folder.rglob("*"))
    done = []
    for _ in range(draw(st.integers(1, 2))):
        live = [p for p in entries if p.exists()]
        if not live:
            break
        target = draw(st.sampled_from(live))
        name = str(target.relative_to(folder))
        if target.is_dir():
            shutil.rmtree(target)
            done.append((name, "deleted folder"))
            continue
        data = target.read_bytes()
        kind = draw(st.sampled_from(["delete", "empty", "truncate", "random", "flip", "text", "json", "yaml"]))
        if kind == "delete":
            target.unlink()
        elif kind == "empty":
            target.write_bytes(b"")
        elif kind == "truncate":
            target.write_bytes(data[:draw(st.integers(0, max(len(data) - 1, 0)))])
        elif kind == "random":
            target.write_bytes(draw(st.binary(max_size=256)))
        elif kind == "flip":
            buf = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                if buf:
                    i = draw(st.integers(0, len(buf) - 1))
                    buf[i] ^= draw(st.integers(1, 255))
            target.write_bytes(bytes(buf))
        elif kind == "text":
            target.write_bytes(draw(st.text(max_size=40)).encode("utf-8"))
        elif kind == "json":
            target.write_text(json.dumps(draw(JSON_VALUE)))
        else:
            target.write_text(yaml.safe_dump(draw(JSON_VALUE)))
        done.append((name, kind))
    return done



def test_intact_checkpoint_copy_loads_and_resumes(tmp_path, checkpoint, only_tiny_model):
    """The fuzzed tests below start from this: an undamaged copy loads and resumes."""
    model_dir, folder = checkpoint
    ck = copy_checkpoint(folder, tmp_path / "run")
    model, tok, config, constraints = load_trained(ck)
    assert config.max_steps == CKPT_STEPS
    trainer = ckpt_trainer(model_dir, tmp_path / "run")
    trainer.train(resume_from_checkpoint=str(ck))
    assert trainer.step == CKPT_STEPS


@pytest.mark.parametrize("what", ["missing", "empty folder", "every file deleted"])
def test_missing_or_empty_checkpoint_is_one_line_error(tmp_path, checkpoint, only_tiny_model, capsys, what):
    model_dir, folder = checkpoint
    path = tmp_path / "run" / folder.name
    if what == "empty folder":
        path.mkdir(parents=True)
    elif what == "every file deleted":
        copy_checkpoint(folder, tmp_path / "run")
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    with pytest.raises(GFNLMError) as e:
        load_trained(path)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(GFNLMError) as e:
        ckpt_trainer(model_dir, tmp_path / "out").train(resume_from_checkpoint=str(path))
    assert len(str(e.value).splitlines()) == 1
    assert run_cli(["sample", "--checkpoint", path, "--prompt", "a", "-n", "1"], capsys) == "error"


@fuzz(40, phases=[Phase.explicit, Phase.generate])  # no shrinking: each example loads a model
@given(data=st.data())
def test_damaged_checkpoint_load(tmp_path, checkpoint, only_tiny_model, capsys, data):
    """load_trained and ``gfnlm sample`` on a damaged copy: loads, or a one-line error."""
    _, folder = checkpoint
    ck = copy_checkpoint(folder, tmp_path / "run")
    done = data.draw(damage(ck), label="damage")
    note = f"damaged {done}"
    try:
        loads_or_one_line_error(load_trained, ck)
        run_cli(["sample", "--checkpoint", ck, "--prompt", "a", "-n", "1"], capsys)
    except BaseException as e:
        e.add_note(note)
        raise


@fuzz(40, phases=[Phase.explicit, Phase.generate])  # no shrinking: each example loads a model
@given(data=st.data())
def test_damaged_checkpoint_resume(tmp_path, checkpoint, only_tiny_model, data):
    """GFNTrainer.train(resume_from_checkpoint=damaged copy): resumes, or a one-line error."""
    model_dir, folder = checkpoint
    ck = copy_checkpoint(folder, tmp_path / "run")
    done = data.draw(damage(ck), label="damage")
    trainer = ckpt_trainer(model_dir, tmp_path / "run")
    try:
        loads_or_one_line_error(trainer.train, resume_from_checkpoint=str(ck))
    except BaseException as e:
        e.add_note(f"damaged {done}")
        raise
