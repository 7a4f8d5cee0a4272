"""How far two float32 computations of the same quantity may differ and still count as equal.

The policy and its reference are separate copies of the same weights, and the rollout
pass and the update pass run different batch shapes. On one CPU they agree bit for bit;
on another (MKL/oneDNN pick kernels by ISA, blocking and memory alignment) the same
log-prob comes out a few float32 ulps apart: 6e-8 nats per sequence was seen on an
AVX-512 Xeon. So step-0 KL and ratio checks compare against a bound instead of 0.0.

The bound: a tiny-model log-prob is a log-softmax over logits of magnitude <= ~20,
each a float32 dot product of length <= 512, whose rounding is <= ~1e-6 absolute;
summed over the <= 8 response tokens of these tests, |KL per sequence| <= ~1e-5.
Any real mismatch (a different temperature, dropout left on, a stale reference)
moves the per-sequence KL by >= 1e-3, two orders above it.
"""

FLOAT32_LOGPROB_NOISE = 1e-5  # nats, per token or per sequence of <= 8 tokens


def is_float32_noise(value: float) -> bool:
    return abs(value) <= FLOAT32_LOGPROB_NOISE
