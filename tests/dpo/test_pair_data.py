"""Preference data: implicit prompts, duplicates and identical pairs, length limits, unpairing (no model, fast)."""

import json

import pytest

from alignment import recipe as recipes
from alignment.errors import DataError
from alignment.stages import preference_common as pref


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------- implicit prompts


def test_implicit_prompt_of_standard_text_ends_at_a_word_boundary():
    row = pref.extract_prompt({"chosen": "Q: What is 7 + 5? A: 12", "rejected": "Q: What is 7 + 5? A: 13"})
    # a character-level prefix would put the shared "1" of both answers into the prompt
    assert row == {"prompt": "Q: What is 7 + 5? A:", "chosen": " 12", "rejected": " 13"}


def test_implicit_prompt_keeps_whole_words_when_the_answers_share_a_start():
    row = pref.extract_prompt({"chosen": "Say it. Certainly yes", "rejected": "Say it. Certainly not"})
    assert row["prompt"] == "Say it. Certainly" and (row["chosen"], row["rejected"]) == (" yes", " not")


def test_implicit_prompt_of_a_conversation_is_the_shared_leading_messages():
    chosen = user("What is 7 + 5?") + assistant("12")
    rejected = user("What is 7 + 5?") + assistant("2")
    assert pref.extract_prompt({"chosen": chosen, "rejected": rejected}) == {
        "prompt": user("What is 7 + 5?"), "chosen": assistant("12"), "rejected": assistant("2")}


def test_implicit_prompt_of_a_multi_turn_conversation_includes_earlier_turns():
    shared = user("Hi") + assistant("Hello!") + user("What is 1 + 1?")
    row = pref.extract_prompt({"chosen": shared + assistant("2"), "rejected": shared + assistant("3"), "id": 7})
    assert row["prompt"] == shared and row["chosen"] == assistant("2") and row["id"] == 7


def test_an_explicit_prompt_is_left_alone():
    row = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    assert pref.extract_prompt(row) is row


def test_a_pair_with_nothing_shared_is_an_error():
    with pytest.raises(DataError, match="share no start"):
        pref.extract_prompt({"chosen": "yes", "rejected": "no"})


def test_mixed_string_and_message_pair_is_an_error():
    with pytest.raises(DataError, match="both"):
        pref.extract_prompt({"chosen": "x y", "rejected": user("x") + assistant("z")})


# ----------------------------------------------------------------------------- duplicates, unpairing


def test_duplicates_are_dropped_and_counted():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": "a", "rejected": "c"}]
    counts = {}
    kept = pref.drop_duplicates(rows, counts)
    assert len(kept) == 2 and counts == {"duplicate pair": 2}


def test_unpair_turns_a_pair_into_a_desirable_and_an_undesirable_row():
    rows = pref.unpair([{"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"), "id": 1}])
    assert rows == [
        {"prompt": user("q"), "id": 1, "completion": assistant("a"), "label": True},
        {"prompt": user("q"), "id": 1, "completion": assistant("b"), "label": False},
    ]


# ----------------------------------------------------------------------------- the whole preparation, counted


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair_recipe(train, evaluation=None, options=None, **data):
    spec = {"train": train, "max_dropped_fraction": 0.9, **data}
    if evaluation:
        spec["eval"] = evaluation
    raw = {"stage": "dpo", "model": {"name_or_path": "tiny:1m"}, "data": spec, "output_dir": "/tmp/unused",
           "options": dict(options or {})}
    return recipes.from_dict(raw, recipes.Locations("<test>"))


def test_prepare_pairs_counts_every_dropped_and_truncated_row(tmp_path, tiny_tokenizer):
    long_answer = " ".join(["9"] * 40)
    rows = [
        {"prompt": user("What is 1 + 2?"), "chosen": assistant("3"), "rejected": assistant("4")},
        # the same pair with an implicit prompt: a duplicate once the prompt is extracted
        {"chosen": user("What is 1 + 2?") + assistant("3"), "rejected": user("What is 1 + 2?") + assistant("4")},
        {"prompt": user("What is 1 + 2?"), "chosen": assistant("3"), "rejected": assistant("4")},
        {"prompt": user("What is 2 + 2?"), "chosen": assistant("4"), "rejected": assistant("4")},  # identical
        {"prompt": user("What is 3 + 3?"), "chosen": assistant("6"), "rejected": assistant(long_answer)},  # too long
        {"prompt": user("What is 9 + 9? " * 10), "chosen": assistant("18"), "rejected": assistant("8")},  # prompt too long
        {"prompt": user("What is 5 + 5?"), "chosen": assistant("10"), "rejected": assistant("0")},
    ]
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = pref.prepare_pairs(pair_recipe(train), tiny_tokenizer, max_length=40)
    report = prepared.reports[0]  # repeats are kept by default (votes), and counted
    assert report["rows_read"] == 7 and report["rows_kept"] == 5
    assert report["dropped"] == {"chosen == rejected": 1, "prompt fills max_length": 1}
    assert report["repeats"] == {"exact repeats": 2, "contradictory rows": 0}
    assert report["truncated_to_max_length"] == 1
    assert prepared.train.column_names == ["prompt", "chosen", "rejected"]
    assert len(prepared.train) == 5

    deduplicated = pref.prepare_pairs(pair_recipe(train, options={"drop_duplicates": True}), tiny_tokenizer,
                                      max_length=40).reports[0]
    assert deduplicated["rows_kept"] == 3
    assert deduplicated["dropped"] == {"chosen == rejected": 1, "duplicate pair": 2, "prompt fills max_length": 1}


def test_max_prompt_tokens_drops_long_prompts(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "What is 1 + 2?", "chosen": " 3", "rejected": " 4"},
            {"prompt": "What is 1 + 2? " * 8, "chosen": " 3", "rejected": " 4"}]
    recipe = pair_recipe(write_jsonl(tmp_path / "pairs.jsonl", rows), max_prompt_tokens=20)
    report = pref.prepare_pairs(recipe, tiny_tokenizer, max_length=None).reports[0]
    assert report["dropped"] == {"prompt longer than data.max_prompt_tokens": 1} and report["rows_kept"] == 1


def test_kto_unpairing_counts_pairs_and_rows_and_separates_a_prompts_two_rows(tmp_path, tiny_tokenizer):
    rows = [{"prompt": user(f"What is {i} + 1?"), "chosen": assistant(str(i + 1)), "rejected": assistant(str(i))}
            for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = pref.prepare_pairs(pair_recipe(path, path), tiny_tokenizer, max_length=64, unpair_rows=True, seed=1)
    report = prepared.reports[0]
    assert report["rows_kept"] == 20 and report["unpaired_rows"] == 40
    train = prepared.train.to_list()
    assert sum(r["label"] for r in train) == 20 and set(train[0]) == {"prompt", "completion", "label"}
    neighbours_share_prompt = sum(a["prompt"] == b["prompt"] for a, b in zip(train, train[1:]))
    assert neighbours_share_prompt < 5, "rows of one pair must be shuffled apart for KTO's KL term"
    assert len(prepared.eval_rows) == 20 and "chosen" in prepared.eval_rows[0]  # held-out pairs stay paired


def test_length_check_tokenizes_exactly_when_bytes_do_not_prove_a_fit(tiny_tokenizer):
    # "1" * 30 is 30 bytes but 30 digit tokens; a multi-byte phrase is far fewer tokens than bytes
    rows = [{"prompt": "What is ", "chosen": "What is What is", "rejected": "1" * 30}]
    counts = {"dropped": {}}
    prompt_ids, chosen_ids = pref.completion_ids(tiny_tokenizer, rows[0]["prompt"], rows[0]["chosen"])
    assert len(prompt_ids) + len(chosen_ids) < 10
    kept = pref.length_pass(tiny_tokenizer, rows, counts, max_length=20, max_prompt_tokens=None)
    assert kept == rows and counts["truncated"] == 1


def test_tokenized_pairs_put_the_end_of_turn_token_in_the_completion(tiny_tokenizer):
    [pair] = pref.tokenize_pairs(tiny_tokenizer, [{"prompt": user("What is 1 + 2?"), "chosen": assistant("3"),
                                                   "rejected": assistant("12")}])
    eos = tiny_tokenizer.eos_token_id
    assert pair.chosen[-1] == eos and pair.rejected[-1] == eos
    assert tiny_tokenizer.decode(pair.chosen[:-1]) == "3" and tiny_tokenizer.decode(pair.rejected[:-1]) == "12"
    assert tiny_tokenizer.decode(pair.prompt).endswith("assistant\n")


def test_eval_fraction_split_is_reported_as_held_out(tmp_path, tiny_tokenizer):
    rows = [{"prompt": user(f"What is {i} + 2?"), "chosen": assistant(str(i + 2)), "rejected": assistant(str(i))}
            for i in range(20)]
    recipe = pair_recipe(write_jsonl(tmp_path / "pairs.jsonl", rows), eval_fraction=0.25)
    prepared = pref.prepare_pairs(recipe, tiny_tokenizer, max_length=64)
    train, held_out = prepared.reports
    assert train["rows_read"] == 20 and train["rows_kept"] == 15
    assert train["dropped"] == {"held out by data.eval_fraction": 5}
    assert held_out["source"].endswith("(eval_fraction=0.25)") and held_out["rows_kept"] == 5
    assert len(prepared.eval_rows) == 5


DEDUPLICATE = {"drop_duplicates": True}  # opt-in since issue 17: repeated pairs are votes by default


def test_rows_lost_to_length_above_max_dropped_fraction_fail_with_the_counts(tmp_path, tiny_tokenizer):
    """Duplicates are free to drop; pairs dropped or cut for length count against data.max_dropped_fraction."""
    long_answer = " ".join(["9"] * 40)
    rows = [{"prompt": user(f"What is {i} + 1?"), "chosen": assistant(str(i + 1)), "rejected": assistant(str(i))}
            for i in range(18)]
    rows += [{"prompt": user("What is 3 + 3?"), "chosen": assistant("6"), "rejected": assistant(long_answer)}]
    rows += [{"prompt": user("What is 9 + 9? " * 10), "chosen": assistant("18"), "rejected": assistant("8")}]
    rows += [rows[0]] * 5  # duplicates: not a loss
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl: 2 of 20 rows are too long \(1 dropped.*1 cut at max_length=40\)"
                                        r".*max_dropped_fraction=0.05"):
        pref.prepare_pairs(pair_recipe(path, options=DEDUPLICATE, max_dropped_fraction=0.05), tiny_tokenizer,
                           max_length=40)
    report = pref.prepare_pairs(pair_recipe(path, options=DEDUPLICATE, max_dropped_fraction=0.1), tiny_tokenizer,
                                max_length=40).reports[0]
    assert report["rows_kept"] == 19 and report["truncated_to_max_length"] == 1
