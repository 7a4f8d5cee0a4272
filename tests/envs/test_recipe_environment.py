"""The `environment:` recipe section: checked at load, naming the key, the file and the line."""

import pytest

from alignment import recipe as recipes
from alignment.errors import RecipeError


def test_loads_with_defaults():
    recipe = recipes.load("recipes/tiny/grpo.yaml",
                          ["environment={source: 'examples/envs/calculator.py:Calculator'}"])
    env = recipe.environment
    assert (env.source, env.kwargs, env.max_turns, env.tool_timeout, env.strict) == (
        "examples/envs/calculator.py:Calculator", {}, 4, 10.0, True)
    assert recipes.load("recipes/tiny/grpo.yaml").environment is None


@pytest.mark.parametrize("override, message", [
    ("environment.max_turn=3", r"environment.max_turn: unknown key 'max_turn' in environment; did you mean 'max_turns'"),
    ("environment.max_turns=0", r"environment.max_turns: must be > 0, got 0"),
    ("environment.tool_timeout=fast", r"environment.tool_timeout: expected a number"),
    ("environment.source=examples/envs/calculator.py", r"environment: source: .* must be 'path/to/file.py:ClassName'"),
    ("environment.source=examples/envs/nope.py:Nope", r"environment: source: file not found: examples/envs/nope.py"),
])
def test_bad_keys_are_named(override, message):
    with pytest.raises(RecipeError, match=message):
        recipes.load("recipes/tiny/grpo_tools.yaml", [override])


def test_error_names_the_file_and_line(tmp_path):
    text = open("recipes/tiny/grpo_tools.yaml").read().replace("  max_turns: 3", "  max_turn: 3")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  max_turn: 3"))
    with pytest.raises(RecipeError, match=rf"{path}:{line}: environment.max_turn: unknown key"):
        recipes.load(path)


def test_stages_that_run_no_environment_refuse_it():
    with pytest.raises(RecipeError, match=r"environment: stage 'rloo' does not run environments \(yet\); stages that "
                                          r"do: grpo, ppo"):
        recipes.load("recipes/tiny/rloo.yaml", ["environment={source: 'examples/envs/calculator.py:Calculator'}"])
