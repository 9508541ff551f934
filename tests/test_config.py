"""GFNConfig: YAML, command-line overrides, and one-line errors."""

from __future__ import annotations

import pytest

from gfnlm.config import GFNConfig, parse_overrides
from gfnlm.errors import ConfigError

YAML = """\
# a run
model: tiny
loss_type: tb
learning_rate: 0.001
max_new_tokens: 7
stop_tokens: [eos, "."]
task_args:
  floor: -50
  n: 3
use_peft: false
"""


def test_yaml_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    c = GFNConfig.from_yaml(p)
    assert c.model == "tiny" and c.loss_type == "tb" and c.learning_rate == 1e-3
    assert c.max_new_tokens == 7 and c.stop_tokens == ["eos", "."] and c.use_peft is False
    assert c.task_args == {"floor": -50, "n": 3}
    assert c.seed == GFNConfig().seed  # unspecified fields keep their defaults
    # round trip through to_yaml
    c.to_yaml(tmp_path / "out.yaml")
    assert GFNConfig.from_yaml(tmp_path / "out.yaml") == c
    # an empty file is the default config
    (tmp_path / "empty.yaml").write_text("")
    assert GFNConfig.from_yaml(tmp_path / "empty.yaml") == GFNConfig()


def test_cli_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    c = GFNConfig.from_yaml(p, [
        "--learning_rate", "3e-4",  # YAML would read '3e-4' as a string: still a float here
        "--max_new_tokens=12",
        "--allowed_tokens", "[a, b, c]",
        "--forbidden_tokens=[x]",
        "--task_args.floor", "-30",
        "--use-peft", "true",
        "--reward_temperature_end", "0.5",
        "--report_to", "[]",
    ])
    assert c.learning_rate == pytest.approx(3e-4) and isinstance(c.learning_rate, float)
    assert c.max_new_tokens == 12
    assert c.allowed_tokens == ["a", "b", "c"] and c.forbidden_tokens == ["x"]
    assert c.task_args == {"floor": -30, "n": 3}  # the nested key is merged, not replaced
    assert c.use_peft is True and c.reward_temperature_end == 0.5 and c.report_to == []
    assert c.loss_type == "tb"  # from the file
    # overrides alone
    c2 = GFNConfig.from_yaml(None, ["--seed", "7", "--loss_type=vargrad"])
    assert c2.seed == 7 and c2.loss_type == "vargrad"
    assert parse_overrides(["--a", "1", "--b=x", "--c.d", "-2.5", "--e", ""]) == {
        "a": 1, "b": "x", "c": {"d": -2.5}, "e": ""}


def test_int_is_accepted_for_float_and_single_value_for_list():
    c = GFNConfig(learning_rate=1, stop_tokens="eos", reward_weights=None)
    assert isinstance(c.learning_rate, float) and c.stop_tokens == ["eos"]


def test_unknown_field_names_it_and_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        GFNConfig.from_dict({"learning_rat": 1e-3})
    msg = str(e.value)
    assert "'learning_rat'" in msg and "did you mean 'learning_rate'" in msg and "\n" not in msg
    p = tmp_path / "c.yaml"
    p.write_text("max_new_token: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config field 'max_new_token' in .*c\.yaml.*'max_new_tokens'"):
        GFNConfig.from_yaml(p)
    with pytest.raises(ConfigError, match=r"'samples_per_promt'.*did you mean 'samples_per_prompt'"):
        GFNConfig.from_yaml(None, ["--samples_per_promt", "8"])
    with pytest.raises(ConfigError, match="'zzzz'") as e:
        GFNConfig.from_dict({"zzzz": 1})
    assert "did you mean" not in str(e.value)  # no suggestion when nothing is close


@pytest.mark.parametrize("field,value,word", [
    ("max_steps", "ten", "int"),
    ("max_steps", 2.5, "int"),
    ("learning_rate", "fast", "float"),
    ("use_peft", "yes please", "bool"),
    ("task_args", [1, 2], "dict"),
    ("stop_tokens", {"a": 1}, "list"),
])
def test_wrong_type(field, value, word):
    with pytest.raises(ConfigError) as e:
        GFNConfig.from_dict({field: value})
    assert f"'{field}'" in str(e.value) and word in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
    (dict(log_z="learned"), "unknown log_z"),
    (dict(tempered_fraction=1.5), "tempered_fraction"),
    (dict(tempered_fraction=0.6, replay_fraction=0.6), "must not exceed 1"),
    (dict(max_steps=0), "max_steps=0"),
    (dict(reward_temperature=0.0), "reward_temperature"),
    (dict(chat_template="sometimes"), "chat_template"),
])
def test_invalid_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        GFNConfig(**kw)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: tiny\nloss_type: tb\nstop_tokens: [eos, '.'\nseed: 3\n")
    with pytest.raises(ConfigError) as e:
        GFNConfig.from_yaml(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "not valid YAML" in msg and "\n" not in msg
    assert "line 4" in msg  # the unclosed list on line 3 is detected at line 4
    p.write_text("model: tiny\n  loss_type: tb\n")
    with pytest.raises(ConfigError, match="line 2"):
        GFNConfig.from_yaml(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        GFNConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="not found"):
        GFNConfig.from_yaml(tmp_path / "missing.yaml")


def test_bad_overrides():
    with pytest.raises(ConfigError, match="--seed has no value"):
        parse_overrides(["--seed"])
    with pytest.raises(ConfigError, match="unexpected argument 'seed'"):
        parse_overrides(["seed", "3"])


def test_reward_temperature_schedule():
    c = GFNConfig(reward_temperature=2.0, reward_temperature_end=0.5, reward_temperature_horizon=10)
    assert c.reward_temperature_at(0) == 2.0
    assert c.reward_temperature_at(5) == pytest.approx(1.25)
    assert c.reward_temperature_at(10) == pytest.approx(0.5)
    assert c.reward_temperature_at(1000) == pytest.approx(0.5)  # held at the end value
    values = [c.reward_temperature_at(s) for s in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # linear, decreasing
    assert values[3] - values[4] == pytest.approx(0.15)
    const = GFNConfig(reward_temperature=3.0)
    assert const.reward_temperature_at(0) == const.reward_temperature_at(99) == 3.0
    # an end value without a horizon is constant
    assert GFNConfig(reward_temperature=3.0, reward_temperature_end=1.0).reward_temperature_at(50) == 3.0
    with pytest.raises(ConfigError):
        GFNConfig(reward_temperature_end=-1.0)
