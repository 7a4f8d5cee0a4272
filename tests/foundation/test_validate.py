"""`align validate` refuses, at file, line and key, the settings a run would refuse, and accepts every documented one.

Each check runs the command itself (`alignment.cli.main(["validate", path])`), so the tests cover the one path
a user meets, not a helper behind it.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from alignment import cli

ROOT = Path(__file__).resolve().parents[2]

HEADER = "# align validate r.yaml\n"
PPO = """\
stage: ppo
model:
  name_or_path: tiny:1m
data:
  train: data/tiny_arith/rl_prompts.jsonl
reward:
  - source: answer_match
output_dir: runs/validate_test
train:
  batch_size: 8
  mini_batch_size: 4
"""
PREFERENCE = """\
stage: {stage}
model:
  name_or_path: tiny:1m
data:
  train: data/tiny_arith/preference.jsonl
output_dir: runs/validate_test
train:
  loss_type: {loss_type}
"""
GRPO = """\
stage: grpo
model:
  name_or_path: tiny:1m
data:
  train: data/tiny_arith/rl_prompts.jsonl
reward:
  - source: answer_match
output_dir: runs/validate_test
train:
  per_device_train_batch_size: 4
  num_generations: 4
  loss_type: {loss_type}
"""


def write(tmp_path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def validate(path: Path, capsys) -> tuple[int, str]:
    """(exit status, printed output) of `align validate PATH`."""
    status = cli.main(["validate", str(path)])
    return status, capsys.readouterr().out


def line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` holding `text` (where the error must point)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def assert_rejected(path: Path, capsys, key: str, line_text: str, *fragments: str) -> str:
    status, out = validate(path, capsys)
    assert status == 1, out
    assert f"{path}:{line_of(path, line_text)}: {key}:" in out, out
    for fragment in fragments:
        assert fragment in out, out
    return out


def test_ppo_recipe_as_written_is_valid(tmp_path, capsys):
    """The base the rejection tests change one line of: valid, so each rejection is that line's doing."""
    status, out = validate(write(tmp_path, PPO), capsys)
    assert status == 0, out


# ----------------------------------------------------------------------------- PPO coefficients


@pytest.mark.parametrize("key, value, rule", [
    ("kl_coef", -1, "must be >= 0"),
    ("vf_coef", -0.5, "must be >= 0"),
    ("cliprange", -0.2, "must be > 0"),
    ("cliprange_value", 0, "must be > 0"),
    ("gamma", 1.5, "must be in [0.0, 1.0]"),
    ("lam", -0.1, "must be in [0.0, 1.0]"),
    ("target_kl", -6, "must be > 0"),
    ("adam_eps", 0, "must be > 0"),
    ("kl_estimator", "k4", "must be one of"),
])
def test_validate_rejects_a_ppo_value_out_of_range(tmp_path, capsys, key, value, rule):
    path = write(tmp_path, PPO + f"  {key}: {value}\n")
    assert_rejected(path, capsys, f"train.{key}", f"{key}: {value}", rule)


def test_validate_rejects_a_ppo_batch_that_does_not_split_into_minibatches(tmp_path, capsys):
    """A rule across keys: the error points at batch_size, the key the rule is about."""
    path = write(tmp_path, PPO.replace("batch_size: 8", "batch_size: 10", 1))
    assert_rejected(path, capsys, "train.batch_size", "batch_size: 10", "divisible by mini_batch_size")


# ----------------------------------------------------------------------------- loss types


@pytest.mark.parametrize("stage", ["dpo", "kto", "cpo", "simpo", "sft"])
def test_validate_rejects_an_unknown_preference_loss_type(tmp_path, capsys, stage):
    path = write(tmp_path, PREFERENCE.format(stage=stage, loss_type="sigmoidd"))
    assert_rejected(path, capsys, "train.loss_type", "loss_type: sigmoidd", "sigmoidd", "must be one of")


def test_validate_rejects_an_unknown_loss_type_in_a_dpo_loss_list(tmp_path, capsys):
    """DPO combines a list of losses (MPO): each name is checked."""
    path = write(tmp_path, PREFERENCE.format(stage="dpo", loss_type="[sigmoid, bco_pairr]"))
    assert_rejected(path, capsys, "train.loss_type", "loss_type: [sigmoid, bco_pairr]", "bco_pairr",
                    "did you mean 'bco_pair'")


def test_validate_rejects_an_unknown_grpo_loss_type(tmp_path, capsys):
    path = write(tmp_path, GRPO.format(loss_type="dr-grpo"))
    assert_rejected(path, capsys, "train.loss_type", "loss_type: dr-grpo", "dr-grpo", "did you mean 'dr_grpo'")


def loss_type_names(stage: str) -> tuple[str, ...]:
    from alignment.recipe import train_choices
    from alignment.stages import stage_spec

    spec = stage_spec(stage)
    return train_choices(spec.config_class(), spec.train_choices)["loss_type"]


@pytest.mark.parametrize("stage", ["dpo", "kto", "cpo", "grpo"])
def test_validate_accepts_every_loss_type_trl_has(tmp_path, capsys, stage):
    names = loss_type_names(stage)
    assert len(names) >= 2
    for name in names:
        template = GRPO if stage == "grpo" else PREFERENCE
        status, out = validate(write(tmp_path, template.format(stage=stage, loss_type=name)), capsys)
        assert status == 0, f"{stage} loss_type {name}: {out}"


def trainer_loss_type_names(trainer_file: str) -> set[str]:
    """Every name trl's trainer compares `loss_type` with: `loss_type == "x"` and `loss_type in ["x", "y"]`."""
    import trl

    text = (Path(trl.__file__).parent / "trainer" / trainer_file).read_text(encoding="utf-8")
    names = set(re.findall(r"loss_type == [\"'](\w+)[\"']", text))
    for group in re.findall(r"loss_type in \[([^\]]*)\]", text):
        names |= set(re.findall(r"[\"'](\w+)[\"']", group))
    return names


@pytest.mark.parametrize("stage, trainer_file", [("dpo", "dpo_trainer.py"), ("grpo", "grpo_trainer.py")])
def test_our_loss_type_lists_are_the_names_trls_trainer_code_handles(stage, trainer_file):
    """trl declares no choices for DPO's and GRPO's loss_type, only an if-chain in the trainer: our list must be
    exactly the names that chain handles, so a name trl adds or drops fails here instead of drifting."""
    assert set(loss_type_names(stage)) == trainer_loss_type_names(trainer_file)


# ----------------------------------------------------------------------------- reward specs


def documented_reward_keys() -> list[str]:
    """The keys of the `## Recipe keys` table of docs/rewards.md (first column, in backticks)."""
    text = (ROOT / "docs" / "rewards.md").read_text(encoding="utf-8")
    section = text.split("## Recipe keys", 1)[1].split("\n## ", 1)[0]
    keys = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert len(keys) >= 10, "the Recipe keys table of docs/rewards.md was not found"
    return keys


# An entry using each documented key, on the kind of source it applies to (a key documented later must be given
# one here: the test then checks it)
URL = "http://127.0.0.1:8000"
EXAMPLE_ENTRIES = {
    "source": {"source": "answer_match"},
    "weight": {"source": "answer_match", "weight": 0.5},
    "name": {"source": "answer_match", "name": "answer"},
    "kwargs": {"source": "answer_match", "kwargs": {"column": "answer"}},
    "timeout": {"source": "answer_match", "timeout": 5},
    "on_error": {"source": "answer_match", "on_error": "skip"},
    "isolate": {"source": "answer_match", "isolate": True},
    "memory_mb": {"source": "answer_match", "isolate": True, "memory_mb": 512},
    "token_env": {"source": URL, "token_env": "RM_TOKEN"},
    "max_consecutive_failures": {"source": "answer_match", "max_consecutive_failures": 3},
    "convention": {"source": "answer_match", "convention": "trl"},
    "columns": {"source": "answer_match", "columns": {"answer": "answer"}},
    "input": {"source": "answer_match", "input": "text"},
    "factory": {"source": "answer_match", "factory": False},
    "protocol": {"source": URL, "protocol": "openrlhf"},
    "requests_per_minute": {"source": URL, "requests_per_minute": 120},
    "max_in_flight": {"source": URL, "max_in_flight": 4},
    "batch_size": {"source": URL, "batch_size": 16},
}


def with_reward(entry: dict) -> str:
    """The PPO recipe with `entry` as its one reward source (JSON is YAML: one flow mapping on one line)."""
    return PPO.replace("  - source: answer_match\n", f"  - {json.dumps(entry)}\n")


def test_docs_document_exactly_the_keys_reward_build_accepts():
    from reward.combine import SPEC_KEYS

    assert sorted(documented_reward_keys()) == sorted(SPEC_KEYS)


@pytest.mark.parametrize("key", documented_reward_keys())
def test_validate_accepts_every_documented_reward_key(tmp_path, capsys, key):
    assert key in EXAMPLE_ENTRIES, f"docs/rewards.md documents {key!r}: give it an example entry here"
    status, out = validate(write(tmp_path, with_reward(EXAMPLE_ENTRIES[key])), capsys)
    assert status == 0, out


def test_every_example_entry_is_one_reward_build_accepts():
    """The entries above are real: reward.build takes each local one (building a URL source calls its /health)."""
    import reward

    for entry in EXAMPLE_ENTRIES.values():
        if not entry["source"].startswith("http"):
            reward.build([entry]).close()


@pytest.mark.parametrize("entry, message", [
    ({"source": "answer_match", "memory_mb": 512}, "'memory_mb' needs 'isolate: true'"),
    ({"source": "answer_match", "token_env": "RM_TOKEN"}, "'token_env' applies only to http(s) URL sources"),
    ({"source": "answer_match", "batch_size": 4}, "['batch_size'] apply to http(s) URL sources only"),
    ({"source": URL, "isolate": True}, "'isolate' applies to local code"),
])
def test_validate_rejects_keys_that_do_not_apply_to_the_source(tmp_path, capsys, entry, message):
    """The rules between keys are reward.build's own (reward.combine.check_key_combination), run at load."""
    path = write(tmp_path, with_reward(entry))
    assert_rejected(path, capsys, "reward.0", json.dumps(entry), message)


def test_validate_rejects_an_unknown_reward_key(tmp_path, capsys):
    path = write(tmp_path, PPO.replace("  - source: answer_match\n", "  - source: answer_match\n    memory_mbb: 1\n"))
    assert_rejected(path, capsys, "reward.0.memory_mbb", "memory_mbb: 1", "did you mean 'memory_mb'")


def test_validate_rejects_a_reward_value_out_of_range(tmp_path, capsys):
    path = write(tmp_path, PPO.replace("  - source: answer_match\n",
                                       "  - source: answer_match\n    max_consecutive_failures: 0\n"))
    assert_rejected(path, capsys, "reward.0.max_consecutive_failures", "max_consecutive_failures: 0", "must be > 0")


EVAL_REWARDS = """\
eval:
  data: data/tiny_arith/eval.jsonl
  rewards:
    - source: answer_match
    - source: length_target
      wieght: 0.1
"""


def test_validate_checks_eval_rewards_of_a_recipe(tmp_path, capsys):
    path = write(tmp_path, PPO + EVAL_REWARDS)
    assert_rejected(path, capsys, "eval.rewards.1.wieght", "wieght: 0.1", "did you mean 'weight'")


def test_validate_checks_rewards_of_a_bare_eval_spec(tmp_path, capsys):
    bare = "data: data/tiny_arith/eval.jsonl\nrewards:\n  - source: answer_match\n  - source: length_target\n" \
           "    wieght: 0.1\n"
    path = write(tmp_path, bare)
    assert_rejected(path, capsys, "rewards.1.wieght", "wieght: 0.1", "did you mean 'weight'")


def test_eval_rewards_as_source_strings_stay_valid(tmp_path, capsys):
    path = write(tmp_path, PPO + "eval:\n  data: data/tiny_arith/eval.jsonl\n  rewards: [answer_match]\n")
    status, out = validate(path, capsys)
    assert status == 0, out


SFT_WITH = """\
stage: sft
model:
  name_or_path: tiny:1m
data:
  train: data/tiny_arith/sft.jsonl
output_dir: runs/validate_test
train:
  max_steps: 10
{extra}"""


def test_validate_builds_trls_config_and_reports_what_trl_refuses(tmp_path, capsys):
    """A combination only TrainingArguments checks (best model at the end needs matching save and eval
    strategies) fails at `align validate`, not after the model has loaded."""
    good = write(tmp_path, SFT_WITH.format(extra="  eval_strategy: steps\n  save_strategy: steps\n"))
    status, out = validate(good, capsys)
    assert status == 0, out
    bad = write(tmp_path, SFT_WITH.format(
        extra="  load_best_model_at_end: true\n  eval_strategy: steps\n  save_strategy: epoch\n"))
    status, out = validate(bad, capsys)
    assert status == 1 and f"FAIL  {bad}: train: SFTConfig rejected the settings" in out, out
    assert "load_best_model_at_end" in out, out
