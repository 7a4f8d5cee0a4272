"""The calculator environment under trl's GRPOTrainer (its own environment_factory), wired from the recipe."""

import json

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete
from alignment.envs import EnvError, EnvironmentSpec
from alignment.envs.trl_bridge import INVALID_CALL, trl_arguments, trl_message

TINY = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=16",
    "eval=null",
    "train.max_steps=2",
    "train.per_device_train_batch_size=8",
    "train.num_generations=4",
    "train.max_completion_length=96",  # a call (64 tokens), its result (8) and the model's next turn
    # a reward that varies within a group (a random model's answers are all wrong): real advantages
    "reward=[{source: answer_match}, {source: 'examples/rewards/brevity.py:brevity'}]",
    "train.logging_steps=1",
    "train.save_steps=2",
    "options.evaluate_before=false",
]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'
BROKEN = '<tool_call>{"name": "add", "arguments": {"a": 2</tool_call><|im_end|>'


def test_parsed_for_trl_by_our_parser(tiny_tokenizer):
    ids = tiny_tokenizer(CALL, add_special_tokens=False)["input_ids"]
    assert trl_message(tiny_tokenizer, ids) == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    broken = trl_message(tiny_tokenizer, tiny_tokenizer(BROKEN, add_special_tokens=False)["input_ids"])
    assert broken["tool_calls"][0]["function"]["name"].startswith(f"{INVALID_CALL} (the call is not valid JSON")
    assert trl_message(tiny_tokenizer, "42<|im_end|>") == {"role": "assistant", "content": "42"}


def test_what_trl_cannot_drive_is_refused(tiny_tokenizer, tmp_path):
    env = tmp_path / "guess.py"
    env.write_text("class Guess:\n    def reset(self, **row):\n        return None\n\n"
                   "    def step(self, action: str):\n        return None, 0.0, True\n")
    with pytest.raises(EnvError, match=r"Guess defines step\(action\), which trl's GRPOTrainer does not call"):
        trl_arguments(EnvironmentSpec(f"{env}:Guess"), tiny_tokenizer)
    undocumented = tmp_path / "bare.py"
    undocumented.write_text("class Bare:\n    def reset(self, **row):\n        return None\n\n"
                            "    def add(self, a, b):\n        return a + b\n")
    with pytest.raises(EnvError, match=r"tool 'add' of Bare: .*type hint"):
        trl_arguments(EnvironmentSpec(f"{undocumented}:Bare"), tiny_tokenizer)


def test_tools_keep_their_schema_and_get_a_time_limit(tiny_tokenizer):
    from transformers.utils import get_json_schema

    factory = trl_arguments(EnvironmentSpec("examples/envs/calculator.py:Calculator", tool_timeout=0.5),
                            tiny_tokenizer)["environment_factory"]
    env = factory()
    assert env.reset(prompt="q") is None and env.add(2, 3) == 5 and env.add(a=4, b=5) == 9
    assert get_json_schema(env.add)["function"]["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "The first integer."},
        "b": {"type": "integer", "description": "The second integer."}}
    with pytest.raises(RuntimeError, match="not arithmetic"):
        env.evaluate("open('x')")


@pytest.fixture
def scripted_first_turns(monkeypatch, tiny_tokenizer):
    """Half the first turns are a call to add (a tiny random model never writes one), one in four a malformed
    call; the turns after a tool result are the model's own."""
    import trl

    original = trl.GRPOTrainer._generate_single_turn
    call, broken = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (CALL, BROKEN))

    def generate(self, prompt_ids, *args, **kwargs):
        completion_ids, logprobs = original(self, prompt_ids, *args, **kwargs)
        for i, prompt in enumerate(prompt_ids):
            first_turn = "<|im_start|>tool" not in tiny_tokenizer.decode(prompt)
            if first_turn and i % 4 in (0, 1):
                completion_ids[i] = list(call if i % 4 == 0 else broken)
        return completion_ids, logprobs

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_single_turn", generate)


def test_grpo_trains_with_the_calculator_environment(tmp_path, scripted_first_turns):
    from alignment.stages import online_rl
    from policies import load

    recipe = recipes.load("recipes/tiny/grpo_tools.yaml", TINY + [f"output_dir={tmp_path}"])
    assert recipe.environment.source == "examples/envs/calculator.py:Calculator"
    initial, _ = load("tiny:1m", seed=recipe.seed)
    metrics = online_rl.run(recipe)
    assert is_complete(tmp_path) and metrics["train_steps"] == 2
    trained, _ = load(str(tmp_path))
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "tools/call_frequency" in entry]
    assert len(steps) == 2
    # 8 completions a step: 2 calls to add (executed), 2 malformed (answered with an error): 4 calls, 2 failed
    assert [(e["tools/call_frequency"], e["tools/failure_frequency"]) for e in steps] == [(0.5, 0.5)] * 2
    assert metrics["env_malformed_calls"] >= 4  # 2 a step, each counted
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["response_template"]["fields"]["tool_calls"]["open"] == "<tool_call>"


def test_plain_tools_go_to_trl_as_tools(tiny_tokenizer, tmp_path):
    source = tmp_path / "plain.py"
    source.write_text("import time\nfrom alignment.envs import ToolBox\n\n\n"
                      "def wait(seconds: float) -> str:\n    \"\"\"Sleep.\n\n    Args:\n        seconds: How long.\n"
                      "    \"\"\"\n    time.sleep(seconds)\n    return 'woke'\n\n\n"
                      "def tools():\n    return ToolBox([wait])\n")
    arguments = trl_arguments(EnvironmentSpec(f"{source}:tools", tool_timeout=0.2), tiny_tokenizer)
    (wait,) = arguments["tools"]
    assert list(arguments) == ["tools"] and wait.__name__ == "wait" and wait(0) == "woke"
    with pytest.raises(RuntimeError, match=r"timed out after 0.2 s"):
        wait(seconds=5)


def test_trl_and_our_runner_append_the_same_environment_tokens(tiny_tokenizer):
    """The tool result's tokens trl appends (its _get_tool_suffix_ids) are the ones our episode runner appends."""
    from types import SimpleNamespace

    import trl

    from alignment.envs.episode import Renderer, reply_tokens

    replies = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "7"}]
    fake_trainer = SimpleNamespace(processing_class=tiny_tokenizer, _tokenizer=tiny_tokenizer, chat_template=None,
                                   chat_template_kwargs={}, _is_vlm=False)
    theirs = trl.GRPOTrainer._get_tool_suffix_ids(fake_trainer, replies)
    before = [{"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}]
    ours = reply_tokens(Renderer(tiny_tokenizer, None), before, replies, tiny_tokenizer.eos_token, 0)
    assert ours == theirs
    assert tiny_tokenizer.decode(ours) == "<|im_start|>tool\n5<|im_end|><|im_start|>tool\n7<|im_end|><|im_start|>assistant\n"
