"""Checklist items 1-10 (data) and the tokenisation bugs peers shipped (pad == EOS, prompt split)."""

from __future__ import annotations

import pytest

from alignment import data
from alignment.errors import DataError, RecipeError

from .conftest import chat_rows, logged, model_dir_with_tokenizer, run_sft, sft_recipe, write_jsonl

PAIR = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}


# ----------------------------------------------------------------------------- 1


@pytest.mark.parametrize(
    "fmt, row, field",
    [
        ("preference", {"prompt": "Q?", "rejected": "bad"}, "chosen"),
        ("preference", {"prompt": "Q?", "chosen": "good"}, "rejected"),
        ("prompt", {"answer": "4"}, "prompt"),
        ("sft", {"prompt": "Q?"}, "completion"),
        ("unpaired", {"completion": "A", "label": True}, "prompt"),
    ],
)
def test_item_01_preference_row_missing_field(tmp_path, fmt, row, field):
    good = {"preference": PAIR, "prompt": {"prompt": "Q?"}, "sft": {"prompt": "Q?", "completion": "A"},
            "unpaired": {"prompt": "Q?", "completion": "A", "label": True}}[fmt]
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good, row])
    with pytest.raises(DataError) as error:
        data.load_rows(path, fmt)
    message = str(error.value)
    assert f"rows.jsonl:3: row 2: missing field {field!r}" in message, message


def test_item_01_mixed_string_and_message_sides_name_the_row(tmp_path):
    row = {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}
    path = write_jsonl(tmp_path / "rows.jsonl", [PAIR, row])
    with pytest.raises(DataError, match=r"rows.jsonl:2: row 1: 'prompt' is a string, 'chosen' is a message list"):
        data.load_rows(path, "preference")


# ----------------------------------------------------------------------------- 2


def test_item_02_equal_or_empty_sides_dropped_counted_and_limited(tmp_path):
    rows = [{"prompt": "Q?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(18)]
    rows += [{"prompt": "Q?", "chosen": "same", "rejected": "same"}, {"prompt": "Q?", "chosen": "  ", "rejected": "x"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"2 of 20 rows dropped .*data.max_dropped_fraction=0.05"):
        data.load_rows(path, "preference")  # 10% dropped > the default 5%
    kept, report = data.load_rows(path, "preference", max_dropped_fraction=0.2)
    assert len(kept) == 18
    assert report.dropped == {"chosen == rejected": 1, "empty chosen or rejected": 1}
    assert (report.rows_read, report.rows_kept) == (20, 18)


# ----------------------------------------------------------------------------- 3


def _no_model_loading(monkeypatch):
    import policies

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(policies, "load", refuse)


@pytest.mark.parametrize("content", ["", "\n\n", "all dropped"])
def test_item_03_empty_dataset_fails_before_any_model_is_loaded(tmp_path, monkeypatch, content):
    if content == "all dropped":
        path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": " "}] * 3)
    else:
        (tmp_path / "train.jsonl").write_text(content)
        path = str(tmp_path / "train.jsonl")
    _no_model_loading(monkeypatch)
    with pytest.raises(DataError, match="empty|no usable rows"):
        run_sft(tmp_path / "run", f"data.train={path}")


@pytest.mark.parametrize("stage", ["dpo", "kto", "simpo", "orpo"])
def test_item_03_preference_stages_check_the_data_before_loading_a_model(stage, tmp_path, monkeypatch):
    from alignment import recipe as recipes
    from alignment.stages import stage_spec

    same = [{"prompt": "What is 1 + 1?", "chosen": " 2", "rejected": " 2"}] * 3  # every row dropped
    path = write_jsonl(tmp_path / "pairs.jsonl", same)
    recipe = recipes.load(f"recipes/tiny/{stage}.yaml", ["model.name_or_path=tiny:1m", f"data.train={path}",
                                                         "data.eval=null", "eval=null",
                                                         f"output_dir={tmp_path / 'run'}"])
    _no_model_loading(monkeypatch)
    with pytest.raises(DataError, match="pairs.jsonl"):
        stage_spec(stage).load_module().run(recipe)


# ----------------------------------------------------------------------------- 4 and 5


@pytest.fixture(scope="module")
def long_prompt_run(tmp_path_factory):
    """20 ordinary rows and 2 whose prompt alone is longer than max_length (trl drops those rows)."""
    tmp = tmp_path_factory.mktemp("long")
    long_rows = [{"prompt": [{"role": "user", "content": "What is " + " + ".join(["1"] * 60) + "?"}],
                  "completion": [{"role": "assistant", "content": "60"}]}] * 2
    path = write_jsonl(tmp / "train.jsonl", chat_rows(20) + long_rows)
    return tmp, path


def test_item_04_prompt_longer_than_the_limit_fails_above_the_fraction(long_prompt_run):
    tmp, path = long_prompt_run
    with pytest.raises(DataError, match=r"2 of 22 rows are too long for max_length=64 .*max_dropped_fraction=0.05"):
        run_sft(tmp / "strict", f"data.train={path}", "train.max_length=64")


def test_item_04_truncated_completion_counted(tmp_path, tiny_tokenizer):
    rows = chat_rows(8, start=100)  # every row has the same length
    full = tiny_tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=True,
                                              return_dict=True)["input_ids"]
    limit = len(full) - 1  # cuts the answer's end-of-turn token off every row
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"8 of 8 rows are too long for max_length={limit} .*8 cut before their end"):
        run_sft(tmp_path / "run", f"data.train={path}", f"train.max_length={limit}")


def test_item_05_zero_trainable_tokens_counted_never_silent(long_prompt_run):
    tmp, path = long_prompt_run
    run_dir = tmp / "lenient"
    metrics = run_sft(run_dir, f"data.train={path}", "train.max_length=64", "data.max_dropped_fraction=0.2",
                      "train.max_steps=1")
    audit = next(r for r in logged(run_dir) if "data/rows" in r)
    assert audit["data/rows"] == 22
    assert audit["data/no_trainable_tokens"] == 2  # dropped by trl, and now counted and reported
    assert audit["data/truncated"] == 0 and audit["data/no_eos_in_loss"] == 0
    assert metrics["train_steps"] == 1


def test_item_05_empty_completion_dropped_and_counted(tmp_path):
    rows = [{"prompt": "Q?", "completion": f"A{i}"} for i in range(30)] + [{"prompt": "Q?", "completion": ""}]
    kept, report = data.load_rows(write_jsonl(tmp_path / "s.jsonl", rows), "sft")
    assert len(kept) == 30 and report.dropped == {"empty completion": 1}


# ----------------------------------------------------------------------------- 6


def test_item_06_conversational_data_without_chat_template_is_an_error(tiny_model_dir, tmp_path):
    plain = model_dir_with_tokenizer(tiny_model_dir, tmp_path / "no_template", chat_template=None)
    with pytest.raises(DataError, match="no chat template"):
        run_sft(tmp_path / "run", f"model.name_or_path={plain}")
    # plain-string rows need no template
    from alignment.stages import common

    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "What is 1 + 2?", "completion": " 3"}] * 4)
    recipe = sft_recipe(tmp_path / "run2", f"model.name_or_path={plain}", f"data.train={path}")
    model, tokenizer = common.load_policy(recipe)
    assert tokenizer.chat_template is None


# ----------------------------------------------------------------------------- 7


NO_EOS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_item_07_eos_outside_the_loss_mask_is_an_error_unless_allowed(tiny_model_dir, tmp_path):
    no_eos = model_dir_with_tokenizer(tiny_model_dir, tmp_path / "no_eos", chat_template=NO_EOS_TEMPLATE)
    with pytest.raises(DataError, match=r"32 of 32 rows have no EOS / end-of-turn token among their trained tokens"):
        run_sft(tmp_path / "run", f"model.name_or_path={no_eos}")
    metrics = run_sft(tmp_path / "allowed", f"model.name_or_path={no_eos}", "data.allow_missing_eos=true",
                      "train.max_steps=1")
    assert metrics["train_steps"] == 1


# ----------------------------------------------------------------------------- 8 (and trl #1623)


def _sft_batch(tokenizer, rows):
    import datasets
    from trl import SFTConfig, SFTTrainer

    import policies

    model, _ = policies.load("tiny:1m")
    args = SFTConfig(output_dir="/tmp/unused-reliability", use_cpu=True, bf16=False, report_to="none", max_steps=1,
                     per_device_train_batch_size=len(rows))
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("style", ["conversational", "standard"])
def test_item_08_pad_equal_to_eos_still_trains_the_eos_label(style):
    from policies.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # what many recipes do, and what broke trl #1623
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = chat_rows(1, start=3) + chat_rows(1, start=1234)  # different lengths: the short row is padded
    if style == "standard":
        rows = [{"prompt": r["prompt"][0]["content"], "completion": " " + r["completion"][0]["content"]} for r in rows]
    batch = _sft_batch(tokenizer, rows)
    eos = tokenizer.eos_token_id
    lengths = batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch else None
    for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
        trained = [int(t) for t, label in zip(ids, labels) if label != -100]
        assert trained and trained[-1] == eos, f"row {i}: the EOS closing the answer must carry a label"
        assert trained.count(eos) == 1, f"row {i}: padding (== EOS) must not be trained on"
    assert lengths is None or lengths[0] != lengths[1]


# ----------------------------------------------------------------------------- 9


def test_item_09_malformed_line_non_utf8_and_wrong_type_name_file_and_line(tmp_path):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [PAIR, '{"prompt": "Q?", "chosen": "x", '])
    with pytest.raises(DataError, match=r"a.jsonl:2: malformed JSON"):
        data.load_rows(bad_json, "preference")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8"):
        data.load_rows(str(tmp_path / "b.jsonl"), "text")
    wrong = write_jsonl(tmp_path / "c.jsonl", [PAIR, "", {"prompt": "Q?", "chosen": 3, "rejected": "bad"}])
    with pytest.raises(DataError, match=r"c.jsonl:3: row 1: field 'chosen' must be a non-empty list of messages"):
        data.load_rows(wrong, "preference")
    column = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "answer": 1}, {"prompt": "Q?", "answer": "one"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: row 1: field 'answer' is str but row 0 has int"):
        data.load_rows(column, "prompt")


def test_item_09_other_file_formats_and_nested_types_name_the_file(tmp_path):
    from alignment.recipe import DataSpec

    (tmp_path / "broken.json").write_text('[{"prompt": "Q?"}, {"prompt": ')
    with pytest.raises(DataError, match=r"broken.json: could not read as json"):
        data.load_rows(str(tmp_path / "broken.json"), "prompt")
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"prompt": "Q?", "meta": [1, 2]}, {"prompt": "R?", "meta": ["a"]}])
    with pytest.raises(DataError, match=r"nested.jsonl: the rows cannot form a table"):
        data.load(DataSpec(train=nested), "prompt")


# ----------------------------------------------------------------------------- 10


def test_item_10_different_tokenizer_between_stages_fails_at_pipeline_start(tiny_model_dir, tmp_path):
    from alignment.pipeline import load_pipeline, plan

    other = model_dir_with_tokenizer(tiny_model_dir, tmp_path / "other_template",
                                     chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    same = model_dir_with_tokenizer(tiny_model_dir, tmp_path / "same_template")

    def pipeline(second_model):
        path = tmp_path / "pipeline.yaml"
        path.write_text(
            "# align pipeline pipeline.yaml\n"
            f"output_root: {tmp_path / 'runs'}\n"
            "stages:\n"
            "  - {name: sft, recipe: recipes/tiny/sft.yaml}\n"
            "  - name: sft2\n"
            "    recipe: recipes/tiny/sft.yaml\n"
            f"    overrides: ['model.name_or_path={second_model}']\n"
            "  - {name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {model.name_or_path: sft}}\n"
        )
        return load_pipeline(path)

    with pytest.raises(RecipeError, match="stage sft2 starts from .*tokenizer or chat template differs"):
        plan(pipeline(other))
    assert len(plan(pipeline(same))) == 3  # the same tokenizer and template: accepted


# ----------------------------------------------------------------------------- peers: trl #2054


def test_peer_prompt_tokenised_alone_equals_its_tokens_inside_prompt_plus_completion(tiny_tokenizer):
    """The trained tokens start exactly where the prompt, tokenised alone with the generation prompt, ends."""
    rows = chat_rows(2, start=7)
    batch = _sft_batch(tiny_tokenizer, rows)
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        alone = tiny_tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        n = len(alone)
        assert ids[:n].tolist() == list(alone)
        assert all(label == -100 for label in labels[:n].tolist())
        assert labels[n] != -100  # the first answer token is trained
    standard = [{"prompt": "What is 12 + 30?", "completion": " 42"}, {"prompt": "What is 1 + 2?", "completion": " 3"}]
    batch = _sft_batch(tiny_tokenizer, standard)
    for row, ids, labels in zip(standard, batch["input_ids"], batch["labels"]):
        alone = tiny_tokenizer(row["prompt"])["input_ids"]
        n = len(alone)
        assert ids[:n].tolist() == alone and all(label == -100 for label in labels[:n].tolist())
        assert labels[n] != -100
