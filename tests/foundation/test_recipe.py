import textwrap

import pytest

from alignment import recipe as recipes
from alignment.errors import RecipeError

BASE = """\
# align run x.yaml
stage: sft
model:
  name_or_path: tiny:1m
data:
  train: data/tiny_arith/sft.jsonl
output_dir: runs/x
train:
  learning_rate: 1.0e-3
  max_steps: 10
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_recipe_is_frozen_and_typed(tmp_path):
    recipe = recipes.load(write(tmp_path, BASE))
    assert recipe.stage == "sft"
    assert recipe.model.name_or_path == "tiny:1m"
    assert recipe.model.dtype == "auto"
    assert recipe.train["learning_rate"] == pytest.approx(1e-3)
    with pytest.raises(AttributeError):
        recipe.stage = "dpo"
    with pytest.raises(TypeError):
        recipe.train["max_steps"] = 3


def test_misspelt_train_key_names_file_line_and_right_key(tmp_path):
    path = write(tmp_path, BASE.replace("learning_rate", "learning_rat"))
    with pytest.raises(RecipeError) as error:
        recipes.load(path)
    message = str(error.value)
    assert f"{path}:9" in message
    assert "learning_rat" in message and "did you mean 'learning_rate'" in message


def test_misspelt_nested_key(tmp_path):
    path = write(tmp_path, BASE.replace("name_or_path", "name_or_pth"))
    with pytest.raises(RecipeError, match=r"r.yaml:4: model.name_or_pth: .*did you mean 'name_or_path'"):
        recipes.load(path)


def test_misspelt_top_level_key(tmp_path):
    path = write(tmp_path, BASE.replace("output_dir", "outptu_dir"))
    with pytest.raises(RecipeError, match="did you mean 'output_dir'"):
        recipes.load(path)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.learning_rate=0", "learning_rate: must be > 0"),
        ("train.learning_rate=-1e-4", "learning_rate: must be > 0"),
        ("train.max_steps=ten", "max_steps: expected an integer"),
        ("model.dtype=float8", "must be one of"),
        ("data.eval_fraction=1.5", r"eval_fraction: must be in \[0, 1\)"),
        ("seed=abc", "seed: expected an integer"),
        ("stage=sftt", "unknown stage 'sftt'; did you mean 'sft'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, pattern):
    with pytest.raises(RecipeError, match=pattern) as error:
        recipes.load(write(tmp_path, BASE), [override])
    assert "command-line override" in str(error.value)


def test_overrides_apply_with_yaml_types(tmp_path):
    recipe = recipes.load(write(tmp_path, BASE), ["train.max_steps=3", "model.lora.r=4", "output_dir=/tmp/o"])
    assert recipe.train["max_steps"] == 3
    assert recipe.model.lora.r == 4
    assert recipe.output_dir == "/tmp/o"
    assert "max_steps: 3" in recipe.resolved_yaml()


def test_missing_required_section(tmp_path):
    with pytest.raises(RecipeError, match="missing required section 'model'"):
        recipes.load(write(tmp_path, "stage: sft\ndata: {train: a.jsonl}\noutput_dir: x\n"))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:[34]: invalid YAML"):
        recipes.load(write(tmp_path, "stage: sft\nmodel:\n  - [unclosed\n"))


def test_secrets_are_redacted_from_saved_recipe(tmp_path):
    recipe = recipes.load(write(tmp_path, BASE), ["train.hub_token=hf_SECRET123"])
    assert "hf_SECRET123" not in recipe.resolved_yaml()
    assert "***" in recipe.resolved_yaml()


def test_redaction_keeps_token_counts_and_hides_token_strings():
    from alignment.recipe import redact

    logged = {"num_tokens": 1024.0, "mean_token_accuracy": 0.5, "hub_token": "hf_SECRET", "api_key_env": "MY_KEY",
              "nested": [{"password": "pw"}], "url": "https://user:pw@example.org/x"}
    assert redact(logged) == {"num_tokens": 1024.0, "mean_token_accuracy": 0.5, "hub_token": "***",
                              "api_key_env": "MY_KEY", "nested": [{"password": "***"}],
                              "url": "https://user:***@example.org/x"}


def test_every_shipped_recipe_validates(repo_root):
    from alignment.cli import validate_file

    for path in recipes.recipe_files([repo_root / "recipes"]):
        assert validate_file(path)


def test_override_indexes_a_list_of_reward_sources(tmp_path):
    recipe = recipes.load("recipes/tiny/ppo.yaml", ["reward.0.source=/tmp/some_rm", "reward.0.weight=2.0"])
    assert recipe.reward[0]["source"] == "/tmp/some_rm" and recipe.reward[0]["weight"] == 2.0
    with pytest.raises(RecipeError, match=r"reward is a list of 1; use an index 0..0"):
        recipes.load("recipes/tiny/ppo.yaml", ["reward.3.source=x"])
