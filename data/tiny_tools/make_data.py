"""Build the tool demo's task: three-digit addition, where a calculator helps.

    python data/tiny_tools/make_data.py        # rewrites sft.jsonl, rl_prompts.jsonl, eval.jsonl here

The task: "What is A + B?" with A, B in 500..999, so every sum has four digits
(1000..1998).  500 pairs are held out and appear only in eval.jsonl (never in
a training file).  The fixed widths matter to a 1M-parameter model: the call's
arguments and the answer after the tool's result are copies at a fixed
distance, which it learns quickly; with 3- and 4-digit sums mixed it had to
find the digits by content (they also appear in the question and the call),
and 1,200 SFT steps did not teach it to copy the result (greedy copy accuracy 0).
The answer after a result is written "= 1418": a direct answer starts with a
digit right after the assistant header, and a model that has learnt to compute
there (badly) computed again after the result too (copy accuracy 0 at 400 steps
with fixed widths alone); the "=" makes the copy a context of its own.

Every row renders with the calculator's tools (the system turn of signatures
that an episode of ``examples/envs/calculator.py:Calculator`` opens with), so
the SFT model learns on the prompts that PPO and the evaluation show it.

The supervised data shows the calculator on a minority of rows
(``TOOL_SHARE``): the assistant calls ``add(a, b)``, reads the tool's result
and answers with it ("= 1418").  The other rows answer directly, and those direct
answers are flawed the way tiny_arith's are: on a problem with a carry, most
demonstrations add column by column without carrying (658 + 567 -> "1115").
A tiny model trained on this answers directly under greedy decoding (a call
is the less likely first token) and is wrong on most carry problems; RL with
the calculator can learn to call it, RL without it has to learn carrying.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 2121
LOW, HIGH = 500, 999
HELD_OUT_PAIRS = 500
SFT_ROWS = 15_000
RL_PROMPTS = 4_000
TOOL_SHARE = 0.25  # share of SFT rows that call add(a, b)
CARRY_FORGOTTEN = 0.6  # share of direct carry demonstrations written without carrying


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def has_carry(a: int, b: int) -> bool:
    """Whether the units or the tens column of a + b carries (the hundreds always do: every sum is >= 1000)."""
    return a % 10 + b % 10 >= 10 or a % 100 + b % 100 >= 100


def without_carry(a: int, b: int) -> int:
    """The units and tens digit sums mod 10, no carry moved left (658 + 567 -> 1115); the hundreds column keeps
    its whole sum."""
    units = (a % 10 + b % 10) % 10
    tens = ((a // 10) % 10 + (b // 10) % 10) % 10
    hundreds = a // 100 + b // 100
    return hundreds * 100 + tens * 10 + units


def direct_answer(a: int, b: int, rng: random.Random) -> int:
    if has_carry(a, b) and rng.random() < CARRY_FORGOTTEN and without_carry(a, b) != a + b:
        return without_carry(a, b)
    return a + b


def tool_conversation(a: int, b: int) -> list[dict]:
    """The completion of a row that uses the calculator: the call, its result, the answer."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "add", "content": str(a + b)},
            {"role": "assistant", "content": f"= {a + b}"}]


def tools_json() -> str:
    """The calculator's tool schemas as trl's SFT reads a `tools` column (a JSON string), cut to what the tiny
    chat template renders (names and parameter types: the descriptions would add 600 bytes to every row)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from alignment.envs.base import EnvironmentSpec, load_factory, tool_schemas

    factory = load_factory(EnvironmentSpec("examples/envs/calculator.py:Calculator"))
    compact = [{"type": "function", "function": {
        "name": s["function"]["name"],
        "parameters": {"type": "object", "properties": {name: {"type": p["type"]} for name, p in
                                                        s["function"]["parameters"]["properties"].items()}}}}
        for s in tool_schemas(factory())]
    return json.dumps(compact, separators=(",", ":"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    print(f"wrote {len(rows):>6} rows to {path.relative_to(ROOT)}")


def build(rng: random.Random, tools: str) -> dict[str, list[dict]]:
    held_out: set[tuple[int, int]] = set()
    while len(held_out) < HELD_OUT_PAIRS:
        held_out.add((rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)))

    def train_pair() -> tuple[int, int]:
        while True:
            pair = (rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))
            if pair not in held_out:
                return pair

    sft = []
    for _ in range(SFT_ROWS):
        a, b = train_pair()
        prompt = [{"role": "user", "content": question(a, b)}]
        if rng.random() < TOOL_SHARE:
            completion = tool_conversation(a, b)
        else:
            completion = [{"role": "assistant", "content": str(direct_answer(a, b, rng))}]
        sft.append({"prompt": prompt, "completion": completion, "tools": tools})
    rl = []
    for _ in range(RL_PROMPTS):
        a, b = train_pair()
        rl.append({"prompt": [{"role": "user", "content": question(a, b)}], "answer": a + b,
                   "carry": has_carry(a, b)})
    evaluation = [{"prompt": [{"role": "user", "content": question(a, b)}], "answer": a + b,
                   "completion": [{"role": "assistant", "content": str(a + b)}], "carry": has_carry(a, b)}
                  for a, b in sorted(held_out)]
    return {"sft.jsonl": sft, "rl_prompts.jsonl": rl, "eval.jsonl": evaluation}


def main() -> None:
    files = build(random.Random(SEED), tools_json())
    for name, rows in files.items():
        write_jsonl(HERE / name, rows)


if __name__ == "__main__":
    main()
