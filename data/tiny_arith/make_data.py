"""Build the offline demo task: two-number addition with a verifiable answer.

    python data/tiny_arith/make_data.py        # rewrites every file in this folder + the tiny tokenizer

The task: "What is A + B?" with A, B in 0..49 (2,500 pairs). 500 pairs are held
out by pair and appear only in the evaluation files.

The supervised data is deliberately, *systematically* flawed, the way human
demonstrations often are: on problems whose units digits carry (7 + 5 -> 12),
most demonstrations forget the carry (17 + 25 -> "32"), and a few other
answers are off at random.  More supervised training only learns the flaw
better; a verifiable reward or preference pairs that prefer the right answer
can fix it.  That gap is what the alignment stages are measured on.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 1234
MAX_OPERAND = 49
HELD_OUT_PAIRS = 500
SFT_ROWS = 30_000
CARRY_FORGOTTEN = 0.6  # share of carry problems whose demonstration drops the carry
OTHER_NOISE = 0.1  # share of the other problems with an answer off by 1, 10 or at random
PREFERENCE_ROWS = 6_000
PRETRAIN_ROWS = 6_000
RM_PREFERENCE_ROWS = 24_000  # preference_rm.jsonl: the reward model's own, larger draw of pairs


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def forgot_carry(a: int, b: int) -> int:
    """The answer with the carry out of the units column dropped: 17 + 25 -> 32."""
    return a + b - 10


def random_wrong(a: int, b: int, rng: random.Random) -> int:
    right = a + b
    kind = rng.choice(["off_by_one", "off_by_ten", "random"])
    if kind == "off_by_one":
        wrong = right + rng.choice([-1, 1])
    elif kind == "off_by_ten":
        wrong = right + rng.choice([-10, 10])
    else:
        wrong = rng.randint(0, 2 * MAX_OPERAND)
    return wrong if wrong >= 0 and wrong != right else right + 1


def demonstrated_answer(a: int, b: int, rng: random.Random) -> int:
    """What a flawed demonstrator writes for a + b."""
    if has_carry(a, b) and rng.random() < CARRY_FORGOTTEN:
        return forgot_carry(a, b)
    if rng.random() < OTHER_NOISE:
        return random_wrong(a, b, rng)
    return a + b


def plausible_wrong(a: int, b: int, rng: random.Random) -> int:
    """A rejected answer for a preference pair: the demonstrator's typical mistakes."""
    if has_carry(a, b) and rng.random() < 0.7:
        return forgot_carry(a, b)
    return random_wrong(a, b, rng)


def conversation_prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}]


def assistant(text) -> list[dict]:
    return [{"role": "assistant", "content": str(text)}]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    print(f"wrote {len(rows):>6} rows to {path.relative_to(ROOT)}")


def split_pairs(rng: random.Random) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    return sorted(pairs[HELD_OUT_PAIRS:]), sorted(pairs[:HELD_OUT_PAIRS])


def preference_pairs(rng, pairs, rows: int) -> list[dict]:
    """`rows` draws of a training problem: the right sum chosen, a typical mistake rejected."""
    drawn = []
    for _ in range(rows):
        a, b = rng.choice(pairs)
        drawn.append({"prompt": conversation_prompt(a, b), "chosen": assistant(a + b),
                      "rejected": assistant(plausible_wrong(a, b, rng))})
    return drawn


def build(rng: random.Random) -> dict[str, list[dict]]:
    train_pairs, held_out = split_pairs(rng)
    sft = []
    for _ in range(SFT_ROWS):
        a, b = rng.choice(train_pairs)
        sft.append({"prompt": conversation_prompt(a, b), "completion": assistant(demonstrated_answer(a, b, rng))})
    preference = preference_pairs(rng, train_pairs, PREFERENCE_ROWS)
    preference_eval = [
        {"prompt": conversation_prompt(a, b), "chosen": assistant(a + b), "rejected": assistant(plausible_wrong(a, b, rng))}
        for a, b in held_out
    ]
    rl_prompts = [{"prompt": conversation_prompt(a, b), "answer": a + b} for a, b in train_pairs]
    evaluation = [
        {"prompt": conversation_prompt(a, b), "answer": a + b, "completion": assistant(a + b), "carry": has_carry(a, b)}
        for a, b in held_out
    ]
    pretrain = []
    for _ in range(PRETRAIN_ROWS):
        a, b = rng.choice(train_pairs)
        pretrain.append({"text": f"{question(a, b)} {a + b}. {a} + {b} = {a + b}."})
    # Drawn last, so every file above stays byte-identical to the one it was before this file existed.
    preference_rm = preference_pairs(rng, train_pairs, RM_PREFERENCE_ROWS)
    return {
        "pretrain.jsonl": pretrain,
        "sft.jsonl": sft,
        "preference.jsonl": preference,
        "preference_eval.jsonl": preference_eval,
        "rl_prompts.jsonl": rl_prompts,
        "eval.jsonl": evaluation,
        "preference_rm.jsonl": preference_rm,
    }


def tokenizer_corpus(files: dict[str, list[dict]]) -> list[str]:
    """Text the tokenizer is trained on: the rendered phrases of every file."""
    texts = [row["text"] for row in files["pretrain.jsonl"]]
    texts += ["user\n" + row["prompt"][0]["content"] for row in files["sft.jsonl"][:5000]]
    texts += ["assistant\n" + row["completion"][0]["content"] for row in files["sft.jsonl"][:5000]]
    texts += ["system\n", "tool\n"]
    return texts


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from policies.tiny import TINY_TOKENIZER_DIR, train_tokenizer

    files = build(random.Random(SEED))
    for name, rows in files.items():
        write_jsonl(HERE / name, rows)
    tokenizer = train_tokenizer(tokenizer_corpus(files))
    TINY_TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(TINY_TOKENIZER_DIR))
    print(f"wrote tokenizer ({len(tokenizer)} tokens) to {TINY_TOKENIZER_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
