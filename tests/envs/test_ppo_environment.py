"""Multi-turn rollouts in our PPO loop: the environment's tokens are context, never trained; GAE bridges them."""

import copy
import json
import math

import pytest
import torch

from alignment.envs import EnvironmentSpec
from alignment.ppo import PPOConfig, PPOTrainer
from alignment.ppo.losses import gae
from policies.value import CausalLMWithValueHead

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'
BROKEN = '<tool_call>{"name": "add", "arguments": {"a": 2</tool_call><|im_end|>'
ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
        for a, b in [(2, 3), (10, 7), (4, 4), (21, 30), (5, 9), (8, 1), (12, 12), (3, 30)]]
SPEC = EnvironmentSpec("examples/envs/calculator.py:Calculator", max_turns=2)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


# ------------------------------------------------------------------ GAE over a masked sequence


def test_gae_bridges_environment_positions_hand_worked():
    # policy turn 1 = positions 0-1, environment reply = 2-3 (masked, NaN), policy turn 2 = 4-5; score 1 at the end.
    # gamma 1, lambda 0.5; values [0.5, 0.4, -, -, 0.7, 0.9]; each step's "next" is the next *policy* position:
    # t=5: delta = 1 - 0.9 = 0.1;                  A5 = 0.1
    # t=4: delta = 0 + 0.9 - 0.7 = 0.2;            A4 = 0.2 + 0.5 * 0.1   = 0.25
    # t=1: delta = 0 + V4 - V1 = 0.7 - 0.4 = 0.3;  A1 = 0.3 + 0.5 * 0.25  = 0.425   (bridged over t=2, 3)
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1;           A0 = -0.1 + 0.5 * 0.425 = 0.1125
    # returns = A + V = [0.6125, 0.825, 0, 0, 0.95, 1.0]
    nan = math.nan
    rewards = torch.tensor([[0.0, 0.0, nan, nan, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, nan, nan, 0.7, 0.9]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[0.1125, 0.425, 0.0, 0.0, 0.25, 0.1]])
    assert close(ret, [[0.6125, 0.825, 0.0, 0.0, 0.95, 1.0]])
    # the same numbers as the policy tokens alone, played as one contiguous response
    compact, _ = gae(rewards[:, [0, 1, 4, 5]], values[:, [0, 1, 4, 5]], torch.ones(1, 4), gamma=1.0, lam=0.5)
    assert close(adv[:, [0, 1, 4, 5]], compact)
    # and not what an estimator that ends the episode at the gap gives (the score would never reach turn 1)
    assert adv[0, 1] != pytest.approx(0.0 - 0.4)


def test_each_episode_gets_its_own_turn_budget(tiny_tokenizer, monkeypatch):
    """A long episode in the batch must not shorten the others' turns (a batch-wide budget cut every answer
    after a long error reply to two tokens); each row stays within the model's positions."""
    from alignment.ppo import episodes as module

    asked = []

    def generate_responses(model, ids, mask, *, max_new_tokens, **kwargs):  # never stops: runs to the budget
        asked.append((ids.shape[0], max_new_tokens))
        return torch.full((ids.shape[0], max_new_tokens), 7, dtype=torch.long)

    monkeypatch.setattr(module, "generate_responses", generate_responses)
    generate = module.turn_generator(None, tiny_tokenizer, max_new_tokens=12, temperature=1.0, max_positions=64)
    out = generate([[5] * 10, [5] * 60, [5] * 64])
    assert [len(o) for o in out] == [12, 4, 0]  # its own room each; the full one gets an empty turn
    assert asked == [(2, 12)]  # the full one is not sampled at all


# ------------------------------------------------------------------ the trainer with an environment


@pytest.fixture
def scripted(monkeypatch, tiny_tokenizer):
    """The first turn of half the episodes is a call to add, one in four a malformed call (a random tiny model
    never writes one); every other turn is the model's own sample.  Records every turn it returned."""
    from alignment.ppo import episodes as module

    original = module.turn_generator
    call, broken = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (CALL, BROKEN))
    returned = []

    def turn_generator(*args, **kwargs):
        generate = original(*args, **kwargs)

        def scripted_generate(sequences):
            new = generate(sequences)
            for i, seq in enumerate(sequences):
                first = "<|im_start|>tool" not in tiny_tokenizer.decode(seq)
                if first and i % 4 in (0, 1):
                    new[i] = list(call if i % 4 == 0 else broken)
            returned.append([list(seq) for seq in sequences])
            returned.append([list(n) for n in new])
            return new

        return scripted_generate

    monkeypatch.setattr(module, "turn_generator", turn_generator)
    return returned


def answer_reward(prompts, completions, answer, **columns):
    return [1.0 if c.strip().startswith(str(a)) else 0.0 for c, a in zip(completions, answer)]


def make_trainer(**overrides):
    import policies

    torch.manual_seed(0)
    model, tokenizer = policies.load("tiny:1m")
    values = dict(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=24, total_steps=2, seed=0,
                  learning_rate=1e-3, kl_coef=0.05)
    values.update(overrides)
    config = PPOConfig(**values)
    policy = CausalLMWithValueHead(model) if config.needs_critic else model
    return PPOTrainer(config, policy, copy.deepcopy(model), None, tokenizer, answer_reward, ROWS, environment=SPEC)


@pytest.mark.parametrize("mini_batch_size", [4, 8])  # 8 = the batch: the first update's forward fills the rollout
def test_ppo_trains_with_the_calculator_and_trains_the_sampled_tokens(scripted, tiny_tokenizer, mini_batch_size):
    trainer = make_trainer(mini_batch_size=mini_batch_size)
    assert trainer._holds_first_forward() == (mini_batch_size == 8)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    history = trainer.train()
    assert len(history) == 2
    moved = max((trainer.policy.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-5
    last = history[-1]
    assert last["env/tool_call_rate"] == pytest.approx(0.25) and last["env/malformed_call_rate"] == pytest.approx(0.25)
    assert last["env/turns"] > 1 and all(math.isfinite(v) for v in last.values() if isinstance(v, float))
    # token in, token out: each row's response is the episode's tokens after the first prompt, and the tokens at
    # policy positions are exactly the ones the generator returned, turn by turn
    rollout, episodes = trainer.last_rollout, trainer.last_episodes
    sampled_turns = [turn for step in scripted[-4:][1::2] for turn in step]  # the last step's generated turns
    for i, episode in enumerate(episodes):
        length = int(rollout.response_mask[i].sum())
        assert rollout.response_ids[i, :length].tolist() == episode.completion_ids
        assert rollout.policy_mask[i, :length].tolist() == [bool(m) for m in episode.completion_mask]
        policy_tokens = rollout.response_ids[i][rollout.token_mask[i]].tolist()
        assert policy_tokens == [t for turn in episode.turns for t in turn.policy_ids]
        assert all(turn.policy_ids in sampled_turns for turn in episode.turns)
        # environment positions carry no statistic
        env = rollout.response_mask[i] & ~rollout.policy_mask[i]
        for name in ("logprobs", "ref_logprobs", "values", "entropy"):
            assert torch.all(getattr(rollout, name)[i][env] == 0)
    assert any((rollout.response_mask[i] & ~rollout.policy_mask[i]).any() for i in range(len(episodes)))


def nonsense_at_environment(logits, values, env_mask):
    """Huge random logits (and values) at environment positions: what a mask must make irrelevant."""
    generator = torch.Generator().manual_seed(1)
    logits, values = logits.clone(), values.clone()
    logits[env_mask] = torch.randn(logits[env_mask].shape, generator=generator) * 1e4
    values[env_mask] = torch.randn(values[env_mask].shape, generator=generator) * 1e6
    return logits, values


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_nonsense_at_environment_positions_changes_no_loss(scripted, kl_in):
    trainer = make_trainer(kl_in=kl_in, kl_estimator="k3")
    rows = trainer._batch_rows(0)
    rollout = trainer._rollout(rows)
    scores, keep, _ = trainer._score(rollout, rows)
    data, _ = trainer._prepare_batch(rollout, scores, keep)
    env_mask = rollout.response_mask & ~rollout.policy_mask
    assert env_mask.any()
    # the advantages and returns are 0 at environment positions, and the score reached the first turn's tokens
    assert torch.all(data["advantages"][env_mask] == 0) and torch.all(data["returns"][env_mask] == 0)
    batch = {k: v for k, v in data.items()}
    batch["rows"] = torch.arange(len(rows))
    real_forward = trainer._forward

    def run(nonsense: bool, loss_mask=None):
        def forward(b):
            logits, values = real_forward(b)
            if nonsense:
                logits, values = nonsense_at_environment(logits, values, env_mask)
            return logits, values

        trainer._forward = forward
        local = dict(batch)
        if loss_mask is not None:
            local["loss_mask"] = loss_mask
        trainer.policy.zero_grad(set_to_none=True)
        loss, stats = trainer._loss(local, num_tokens=float(local["loss_mask"].sum()))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.policy.parameters() if p.grad is not None]
        trainer._forward = real_forward
        return loss.detach(), stats, grads

    loss, stats, grads = run(False)
    loss_n, stats_n, grads_n = run(True)
    assert torch.isfinite(loss_n) and all(torch.isfinite(g).all() for g in grads_n)
    assert torch.equal(loss, loss_n)
    for name in ("policy/loss", "value/loss", "policy/approx_kl") + (("policy/kl_loss",) if kl_in == "loss" else ()):
        assert stats[name] == stats_n[name], name
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_n))
    # without the environment mask (every real token in the loss) the same nonsense changes everything
    unmasked = rollout.response_mask & keep.unsqueeze(-1)
    loss_u, stats_u, _ = run(False, unmasked)
    loss_un, stats_un, _ = run(True, unmasked)
    assert not torch.equal(loss_u, loss_un) and stats_u["value/loss"] != stats_un["value/loss"]


def test_recipe_runs_ppo_with_an_environment(tmp_path, scripted):
    from alignment import recipe as recipes
    from alignment.stages import ppo

    recipe = recipes.load("recipes/tiny/ppo_tools.yaml", [
        "model.name_or_path=tiny:1m", "data.max_samples=16", "train.total_steps=1", "train.batch_size=8",
        "train.mini_batch_size=4", "train.ppo_epochs=1", "train.max_new_tokens=24", "eval.max_samples=8",
        "eval.max_new_tokens=24", "options.evaluate_before=false", f"output_dir={tmp_path}"])
    metrics = ppo.run(recipe)
    after = metrics["after"]
    for key in ("greedy_accuracy", "greedy/env/tool_call_rate", "greedy/env/malformed_call_rate", "greedy/env/turns",
                "greedy_reward", "transcripts"):
        assert key in after, key
    assert set(after["by_carry"]) <= {"true", "false"} and len(after["transcripts"]) == 3
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "env/tool_call_rate" in logged[0] and "env/malformed_call_rate" in logged[0]
    # align eval on the checkpoint: its recipe names the environment, so it is measured in episodes
    from alignment.evaluation.runner import evaluate_checkpoints

    report = evaluate_checkpoints({"ppo": str(tmp_path)}, output_dir=tmp_path / "eval")
    measured = report["checkpoints"]["ppo"]["metrics"]
    assert measured["environment"] == "examples/envs/calculator.py:Calculator"
    for key in ("greedy_accuracy", "greedy/env/tool_call_rate", "greedy/env/malformed_call_rate", "greedy/env/turns"):
        assert key in measured, key
    assert measured["num_prompts"] == 8 and (tmp_path / "eval" / "report.md").is_file()
    assert "<|im_end|>" in report["checkpoints"]["ppo"]["samples"][0]["completion"]
