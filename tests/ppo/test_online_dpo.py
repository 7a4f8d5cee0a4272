"""Online DPO's math against hand-worked numbers, and its trainer on tiny models."""

import copy
import math

import pytest
import torch

from alignment.ppo.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, best_worst_pairs, dpo_loss

from .conftest import make_llama


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_dpo_losses_by_hand():
    # chosen: log pi = -1, log pi_ref = -2 (+1); rejected: log pi = -3, log pi_ref = -2 (-1): margin h = 2
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, margin = dpo_loss(*args, beta=0.5, loss_type="sigmoid")
    assert close(margin, [2.0]) and close(loss, [math.log1p(math.exp(-1.0))])  # -log sigmoid(0.5 x 2) = 0.31326
    loss, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert close(loss, [(2.0 - 1.0) ** 2])  # (h - 1/(2 beta))^2 = (2 - 1)^2
    loss, _ = dpo_loss(*args, beta=0.25, loss_type="hinge")
    assert close(loss, [0.5])  # max(0, 1 - 0.25 x 2)
    # + sft_weight 2 x the chosen mean token NLL: -(-1) / 4 tokens = 0.25 -> 0.31326 + 0.5
    loss, _ = dpo_loss(*args, beta=0.5, sft_weight=2.0, chosen_length=torch.tensor([4]))
    assert close(loss, [math.log1p(math.exp(-1.0)) + 0.5])
    with pytest.raises(KeyError, match="hinge, ipo, sigmoid"):
        dpo_loss(*args, beta=0.5, loss_type="kto")


def test_pairs_are_each_groups_best_and_worst():
    scores = torch.tensor([0.0, 1.0, 0.5, 1.0,   2.0, 2.0, 2.0, 2.0,   3.0, -1.0, 5.0, 0.0])
    keep = torch.tensor([True] * 8 + [True, True, False, True])
    chosen, rejected = best_worst_pairs(scores, keep, 4)
    # group 1: best 1.0 first at row 1, worst 0.0 at row 0; group 2 all tie: no pair;
    # group 3: row 10 (5.0) is dropped, so best 3.0 at row 8, worst -1.0 at row 9
    assert chosen.tolist() == [1, 8] and rejected.tolist() == [0, 9]


@pytest.mark.parametrize("kwargs, key", [({"num_generations": 1}, "num_generations"), ({"beta": 0}, "beta"),
                                         ({"loss_type": "dpo"}, "loss_type"), ({"vf_coef": 0.5}, "vf_coef"),
                                         ({"kl_coef": 0.2}, "kl_coef")])
def test_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        OnlineDPOConfig(**kwargs)
    assert info.value.key == key


def test_a_step_raises_the_chosen_margin_and_trains_no_critic(tokenizer, tmp_path):
    prompts = [{"prompt": p} for p in ("a b", "c d e", "f", "g h a b")]

    def reward(prompts, completions, **kwargs):  # prefer responses with many "a"s
        return [float(c.split().count("a")) for c in completions]

    config = OnlineDPOConfig(batch_size=16, num_generations=4, mini_batch_size=2, ppo_epochs=3, max_new_tokens=4,
                             learning_rate=1e-3, total_steps=4, seed=0, beta=0.5)
    lm = make_llama(tokenizer, seed=0)
    trainer = OnlineDPOTrainer(config, lm, copy.deepcopy(lm), tokenizer, reward, prompts)
    assert trainer.critic is None
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    metrics = trainer.step()
    assert metrics["dpo/pairs"] + metrics["dpo/tied_prompts"] == 4 and metrics["dpo/pairs"] >= 1
    # three updates on the same pairs: the mean margin of the epochs is above 0, where it starts
    assert metrics["dpo/margin"] > 0 and math.isfinite(metrics["dpo/loss"]) and metrics["dpo/loss"] < math.log(2)
    assert metrics["dpo/chosen_score"] > metrics["dpo/rejected_score"]
    assert max((trainer.policy.state_dict()[k] - v).abs().max().item() for k, v in before.items()) > 1e-4
    trainer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and not (tmp_path / "ckpt" / "critic").exists()
