"""The PPO math against numbers worked out by hand (each computation in a comment)."""

import math

import pytest
import torch

from alignment.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    place_score_at_last_token,
)

NAN = float("nan")


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol
    )


def test_logprobs_from_logits_with_temperature():
    # logits [0, ln 3]: softmax = [1/4, 3/4] -> log p(token 1) = ln 0.75, log p(token 0) = ln 0.25
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    assert close(logprobs_from_logits(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    # T = 2: logits/2 = [0, ln 3 / 2] -> p = [1, sqrt3] / (1 + sqrt3)
    s3 = math.sqrt(3.0)
    expected = [[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]]
    assert close(logprobs_from_logits(logits, tokens, temperature=2.0), expected)


def test_entropy_from_logits():
    # uniform over 2: H = ln 2; [1/4, 3/4]: H = -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert close(entropy_from_logits(logits), [math.log(2.0), h])
    # T = 2 on [0, 2 ln 3] is the same distribution as T = 1 on [0, ln 3]
    assert close(entropy_from_logits(torch.tensor([0.0, 2 * math.log(3.0)]), temperature=2.0), h)


def test_masked_mean_and_var_ignore_nan_in_masked_slot():
    x = torch.tensor([1.0, 2.0, NAN, 4.0])
    m = torch.tensor([1, 1, 0, 1])
    # mean = (1 + 2 + 4) / 3 = 7/3
    assert close(masked_mean(x, m), 7 / 3)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # biased: 14/3 / 3 = 14/9; unbiased: 14/3 / 2 = 7/3
    assert close(masked_var(x, m, unbiased=False), 14 / 9)
    assert close(masked_var(x, m, unbiased=True), 7 / 3)
    # per-row means: row0 [1, 2] -> 1.5; row1 [NaN masked, 4] -> 4
    assert close(masked_mean(x.view(2, 2), m.view(2, 2), dim=1), [1.5, 4.0])
    # an empty mask gives 0, not NaN
    assert masked_mean(x, torch.zeros(4)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, NAN])
    m = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / 2 = 1 -> [-1, 0, 1], masked slot 0
    assert close(masked_whiten(x, m), [-1.0, 0.0, 1.0, 0.0])
    # shift_mean=False adds the mean back: [1, 2, 3]
    assert close(masked_whiten(x, m, shift_mean=False), [1.0, 2.0, 3.0, 0.0])


def test_kl_estimators():
    # p = 0.5 (policy), q = 0.25 (reference); log r = ln(q/p) = -ln 2
    logp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    ln2 = math.log(2.0)
    assert close(kl_k1(logp, ref), ln2)  # log p - log q = ln 2 = 0.693147
    assert close(kl_k2(logp, ref), 0.5 * ln2**2)  # 0.5 * (ln 2)^2 = 0.240227
    assert close(kl_k3(logp, ref), (0.5 - 1) + ln2)  # (r - 1) - ln r = -0.5 + 0.693147 = 0.193147
    assert close(kl_estimate(logp, ref, "k3"), kl_k3(logp, ref))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k4")


def test_score_lands_on_last_real_token_left_and_right_padded():
    scores = torch.tensor([2.0, 5.0, 7.0])
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right-padded: last real token at index 2
            [0, 0, 1, 1, 1],  # left-padded: last real token at index 4
            [0, 0, 0, 0, 0],  # empty: nothing placed
        ]
    )
    expected = torch.tensor([[0, 0, 2.0, 0, 0], [0, 0, 0, 0, 5.0], [0, 0, 0, 0, 0]])
    assert torch.equal(place_score_at_last_token(scores, mask), expected)


def test_per_token_rewards():
    # kl = logp - ref = [0.5, 0, 0.5, masked]; -beta*kl with beta 0.1 = [-0.05, 0, -0.05, 0]
    # score 3 on the last valid token (index 2): [-0.05, 0, 2.95, 0]
    logp = torch.tensor([[-1.0, -2.0, -0.5, NAN]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    r = per_token_rewards(torch.tensor([3.0]), logp, ref, mask, beta=0.1)
    assert close(r, [[-0.05, 0.0, 2.95, 0.0]])


def test_gae_hand_worked():
    # gamma 1, lambda 0.95, rewards [0, 0, 1], values [0.5, 0.6, 0.7], episode ends after t=2:
    # t=2: delta = 1 - 0.7 = 0.3;             A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;       A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;       A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, NAN], [NAN, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, NAN], [NAN, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert close(adv, [[0.46575, 0.385, 0.3, 0.0], [0.0, 0.46575, 0.385, 0.3]])
    assert close(ret, [[0.96575, 0.985, 1.0, 0.0], [0.0, 0.96575, 0.985, 1.0]])
    # gamma 0.9, lambda 0.5 (gamma*lambda = 0.45):
    # t=2: delta = 0.3; A2 = 0.3
    # t=1: delta = 0.9*0.7 - 0.6 = 0.03;  A1 = 0.03 + 0.45*0.3 = 0.165
    # t=0: delta = 0.9*0.6 - 0.5 = 0.04;  A0 = 0.04 + 0.45*0.165 = 0.11425
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    assert close(adv, [[0.11425, 0.165, 0.3, 0.0]])
    assert close(ret, [[0.61425, 0.765, 1.0, 0.0]])


def test_clipped_policy_loss_hand_worked_and_nan_safe():
    # tok0: ratio 1.5, A=+1: -A*rho = -1.5, -A*clip(rho) = -1.2 -> max -1.2 (clipped)
    # tok1: ratio 0.5, A=+1: -0.5 vs -0.8 -> max -0.5 (unclipped)
    # tok2: ratio 0.5, A=-2:  1.0 vs  1.6 -> max  1.6 (clipped)
    # tok3: masked, NaN everywhere
    # loss = (-1.2 - 0.5 + 1.6) / 3 = -0.0333333; clipfrac = 2/3
    # approx_kl = mean((rho-1) - ln rho) = (0.5 - ln 1.5 + 2 * (-0.5 + ln 2)) / 3 = 0.1602763
    old = torch.tensor([[-1.0, -1.0, -1.0, NAN]])
    new = (old + torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.0]]))).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    assert close(loss, -0.1 / 3)
    assert close(clipfrac, 2 / 3)
    assert close(approx_kl, (0.5 - math.log(1.5) + 2 * (-0.5 + math.log(2.0))) / 3)
    loss.backward()
    assert torch.isfinite(new.grad).all()
    # only tok1 is unclipped: d/dnew (-A rho)/3 = -rho/3 = -0.5/3; clipped tokens have zero gradient
    assert close(new.grad, [[0.0, -0.5 / 3, 0.0, 0.0]])
    # num_tokens=6: the same masked sum divided by 6 = -0.1/6
    loss6, _, _ = clipped_policy_loss(new, old, adv, mask, clip=0.2, num_tokens=6)
    assert close(loss6, -0.1 / 6)


def test_clipped_policy_loss_ratio_one_is_plain_policy_gradient():
    # rho = 1 everywhere: loss = -mean(A) = -(1 + 3) / 2 = -2, nothing clipped, approx_kl 0
    logp = torch.tensor([[-0.3, -0.7]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, logp, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert close(loss, -2.0) and clipfrac.item() == 0.0 and approx_kl.item() == 0.0


def test_clipped_value_loss_hand_worked_and_nan_safe():
    # tok0: new 1.5, old 1.0 -> V_clip 1.2; R 2: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # tok1: new 0.9, old 1.0 -> V_clip 0.9; R 0: 0.81, 0.81 -> 0.81 (not clipped)
    # tok2: new 0.5, old 0.0 -> V_clip 0.2; R 0.4: 0.01, 0.04 -> 0.04 (clipped)
    # loss = 0.5 * (0.64 + 0.81 + 0.04) / 3 = 0.2483333; clipfrac = 2/3
    new = torch.tensor([[1.5, 0.9, 0.5, NAN]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0, NAN]])
    ret = torch.tensor([[2.0, 0.0, 0.4, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = clipped_value_loss(new, old, ret, mask, clip=0.2)
    assert close(loss, 0.5 * 1.49 / 3)
    assert close(clipfrac, 2 / 3)
    loss.backward()
    # only tok1 passes gradient: d/dv 0.5 * (v - R)^2 / 3 = (0.9 - 0) / 3 = 0.3
    assert close(new.grad, [[0.0, 0.3, 0.0, 0.0]])


def test_kl_controllers():
    # target 6, horizon 10000, n_steps 100: K = 0.01
    # KL 9: error = clip(9/6 - 1 = 0.5) = 0.2  -> beta = 0.1 * (1 + 0.2 * 0.01) = 0.1002
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 100)
    assert close(ctl.value, 0.1002)
    # KL 3: error = clip(-0.5) = -0.2 -> beta = 0.1002 * 0.998
    ctl.update(3.0, 100)
    assert close(ctl.value, 0.1002 * 0.998)
    # KL 6.6: error 0.1 (inside the clip) -> * 1.001
    ctl.update(6.6, 100)
    assert close(ctl.value, 0.1002 * 0.998 * 1.001)
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05
