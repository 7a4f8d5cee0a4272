"""Build raw_corpus.jsonl: a small, deliberately dirty text corpus for `align data prepare`.

    python data/tiny_arith/make_raw_corpus.py        # rewrites data/tiny_arith/raw_corpus.jsonl

Clean rows are short texts about addition (word problems, worked sums, number
lines, prices), generated so that no two of them are near-duplicates (their
character 5-gram Jaccard similarity stays below CLEAN_MAX_SIMILARITY).  Then
known defects are planted among them, each row labelled with the filter that
must remove it (`"planted": "<filter>"`), so a test can check that every filter
removes exactly what was planted:

* exact_duplicate - copies of earlier rows: verbatim, with extra spaces, and with
  full-width digits (equal after NFKC normalisation)
* near_duplicate - copies of earlier rows with one character changed
* control - new rows with control / zero-width characters inside; they must be
  *kept*, cleaned (label "control", not a filter)
* empty, too_short, too_long, low_alnum_share, repeated_chars - junk
* malformed - lines that are not JSON objects with a string "text" (unlabelled:
  they cannot carry a label), and blank lines are counted as empty
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "raw_corpus.jsonl"
SEED = 2024
CLEAN_ROWS = 300
CONTROL_ROWS = 8
CLEAN_MAX_SIMILARITY = 0.5

NAMES = ["Ava", "Ben", "Chloe", "Dmitri", "Esme", "Farid", "Grace", "Hugo", "Ines", "Jonah", "Kiri", "Leo",
         "Maya", "Nils", "Olu", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Wen", "Ximena",
         "Yusuf", "Zoe"]
OBJECTS = ["apples", "marbles", "stickers", "shells", "pencils", "cards", "buttons", "stamps", "beads", "coins",
           "acorns", "books", "kites", "plums", "ribbons", "tickets"]
PLACES = ["the market", "school", "the beach", "a fair", "the library", "the park", "a garage sale",
          "the harbour", "a birthday party", "the orchard"]
ITEMS = ["pen", "ruler", "notebook", "bun", "candle", "map", "whistle", "yo-yo", "comb", "mug", "kite string",
         "postcard", "badge", "sponge"]
VERBS = ["found", "was given", "bought", "won", "collected", "picked up", "borrowed", "traded for"]


def word_problem(rng: random.Random, a: int, b: int) -> str:
    name, obj, place, verb = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(VERBS)
    return (f"{name} had {a} {obj} before going to {place}, where {name} {verb} {b} more. "
            f"Counting them all gives {a + b} {obj}.")


def worked_sum(rng: random.Random, a: int, b: int) -> str:
    units = a % 10 + b % 10
    carry = units // 10
    step = (f"write {units % 10} and carry 1 to the tens" if carry else f"write {units} in the units place")
    return (f"Work out {a} + {b} column by column. Units: {a % 10} + {b % 10} = {units}, so {step}. "
            f"Tens: {a // 10} + {b // 10}{' + 1' if carry else ''} = {a // 10 + b // 10 + carry}. Result: {a + b}.")


def number_line(rng: random.Random, a: int, b: int) -> str:
    return (f"On a number line, start at {a} and hop {b} steps to the right; "
            f"you land on {a + b}, which is why {a} + {b} = {a + b}.")


def prices(rng: random.Random, a: int, b: int) -> str:
    first, second = rng.sample(ITEMS, 2)
    return f"A {first} costs {a} cents and a {second} costs {b} cents, so paying for both takes {a + b} cents."


def swap(rng: random.Random, a: int, b: int) -> str:
    return (f"Order does not matter when adding: {b} + {a} and {a} + {b} both equal {a + b}, "
            f"a fact called the commutative property.")


def making_ten(rng: random.Random, a: int, b: int) -> str:
    gap = 10 - a % 10
    if a % 10 == 0 or gap >= b:
        return number_line(rng, a, b)
    return (f"Make a ten to add {b} to {a}: {a} + {gap} = {a + gap}, then add the remaining {b - gap} "
            f"to reach {a + b}.")


TEMPLATES = [word_problem, worked_sum, number_line, prices, swap, making_ten]

JUNK = {
    "empty": ["", "   ", "\t\n ", "\u3000\u3000 "],
    "too_short": ["ok", "2 + 2 = 4", "yes, 12", "What is 9?"],
    "low_alnum_share": ["!!! ??? ### $$$ %%% *** +++", "-- == ++ ;; :: <> {} [] || // ~~",
                        "\U0001f600\U0001f603\U0001f604 \U0001f601\U0001f606\U0001f605 \U0001f923\U0001f602\U0001f642 "
                        "\U0001f60a\U0001f607\U0001f643 \U0001f609\U0001f60c\U0001f60d \U0001f970\U0001f618 = 42",
                        "(((( )))) [[[ ]]] {{{ }}} <<< >>> ... ,,,"],
    "repeated_chars": ["Whaaaaaaaaaaaaaaat is 12 + 30? It is 42.", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
                       "The answer is 4444444444444444 and that is final.",
                       "So many sums, so little time: 1 + 1 = 2 hahahahaha aaaaaaaaaaaa"],
}
MALFORMED = ['this line is not JSON {"text": "What is 1 + 1?"', '{"title": "a row without a text field"}',
             '{"text": 42}', '["text", "a list, not an object"]']
CONTROL_CHARS = ["\x00", "\x07", "\x1b", "\x7f", "\x0c", "\u200b", "\ufeff", "\x08"]
FULLWIDTH = str.maketrans("0123456789", "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19")


def shingles(text: str, size: int = 5) -> set[str]:
    """Character 5-grams of the lower-cased text (the same shingles `align data prepare` uses)."""
    text = text.lower()
    return {text} if len(text) <= size else {text[i : i + size] for i in range(len(text) - size + 1)}


def distinct_rows(rng: random.Random, count: int, taken: list[set]) -> list[str]:
    """`count` new texts, each with Jaccard similarity < CLEAN_MAX_SIMILARITY to every text so far."""
    rows = []
    while len(rows) < count:
        a, b = rng.randint(0, 49), rng.randint(1, 49)
        text = rng.choice(TEMPLATES)(rng, a, b)
        grams = shingles(text)
        if all(len(grams & other) / len(grams | other) < CLEAN_MAX_SIMILARITY for other in taken):
            taken.append(grams)
            rows.append(text)
    return rows


def change_one_char(rng: random.Random, text: str) -> str:
    """Replace one letter in the middle of the text by another letter."""
    while True:
        i = rng.randrange(len(text) // 4, 3 * len(text) // 4)
        if text[i].isalpha():
            replacement = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != text[i].lower()])
            return text[:i] + replacement + text[i + 1 :]


def long_text(rng: random.Random, chars: int) -> str:
    parts = []
    while sum(len(p) + 1 for p in parts) < chars:
        parts.append(rng.choice(TEMPLATES)(rng, rng.randint(0, 49), rng.randint(1, 49)))
    return " ".join(parts)


def build(seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    taken: list[set] = []
    clean = distinct_rows(rng, CLEAN_ROWS, taken)
    lines: list[str] = [json.dumps({"id": f"c{i:03d}", "text": t}, ensure_ascii=False) for i, t in enumerate(clean)]

    # Planted rows go after the row they copy, so the copy (not the original) is the one removed.
    planted: list[tuple[int, str]] = []  # (insert after this clean index, JSON line)

    def plant(after: int, kind: str, text: str) -> None:
        planted.append((after, json.dumps({"id": f"p{len(planted):03d}", "planted": kind, "text": text},
                                          ensure_ascii=False)))

    long_rows = [i for i in range(CLEAN_ROWS // 2) if len(clean[i]) >= 100]
    sources = rng.sample(long_rows, 24)
    for n, i in enumerate(sources[:12]):  # exact duplicates: verbatim, extra whitespace, full-width digits
        text = clean[i]
        variant = [text, "  " + text.replace(" ", "   ", 3) + " \t", text.translate(FULLWIDTH)][n % 3]
        plant(rng.randrange(i, CLEAN_ROWS), "exact_duplicate", variant)
    for i in sources[12:]:  # near duplicates: one character changed (only long rows, so similarity stays high)
        plant(rng.randrange(i, CLEAN_ROWS), "near_duplicate", change_one_char(rng, clean[i]))
    for text in distinct_rows(rng, CONTROL_ROWS, taken):
        cut = sorted(rng.sample(range(1, len(text)), 2))
        chars = rng.sample(CONTROL_CHARS, 2)
        plant(rng.randrange(CLEAN_ROWS), "control", text[: cut[0]] + chars[0] + text[cut[0] : cut[1]] + chars[1] + text[cut[1] :])
    for kind, texts in JUNK.items():
        for text in texts:
            plant(rng.randrange(CLEAN_ROWS), kind, text)
    for _ in range(2):
        plant(rng.randrange(CLEAN_ROWS), "too_long", long_text(rng, 10_500))
    for text in MALFORMED:
        planted.append((rng.randrange(CLEAN_ROWS), text))
    for _ in range(2):
        planted.append((rng.randrange(CLEAN_ROWS), ""))  # blank lines

    out: list[str] = []
    by_position: dict[int, list[str]] = {}
    for after, line in planted:
        by_position.setdefault(after, []).append(line)
    for i, line in enumerate(lines):
        out.append(line)
        out.extend(by_position.get(i, []))
    return out


def main() -> None:
    lines = build()
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines to {OUTPUT}")


if __name__ == "__main__":
    main()
