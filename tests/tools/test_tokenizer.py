"""`align data tokenizer`: trained tokenizers load with AutoTokenizer and round-trip text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from alignment.errors import DataError
from alignment.tools.tokenizer import iter_texts, train
from policies.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

CORPUS = "data/tiny_arith/pretrain.jsonl"
SAMPLES = ["What is 17 + 25? 42. 17 + 25 = 42.", "What is 0 + 49? 49.", "Héllo wörld, 3 + 4 = 7 ✓"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, repo_root):
    from alignment import cli

    out = tmp_path_factory.mktemp("bpe")
    assert cli.main(["data", "tokenizer", str(repo_root / CORPUS), "--output", str(out), "--vocab-size", "300"]) == 0
    return out


def test_bpe_round_trip_through_auto_tokenizer(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    for text in SAMPLES + list(iter_texts(CORPUS))[:200]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text  # byte-level: exact, even for characters never seen
        assert tokenizer.unk_token_id not in ids


def test_special_tokens_distinct_digits_split_and_chat_template(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "unk", "bos", "eos")}
    assert len(set(ids.values())) == 4 and None not in ids.values()
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids.values()] == SPECIAL_TOKENS
    tokens = tokenizer.tokenize("12345 + 678")
    assert [t.lstrip("Ġ") for t in tokens if t.lstrip("Ġ").isdigit()] == list("12345678")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 1 + 2?<|im_end|><|im_start|>assistant\n"
    report = json.loads((bpe_dir / "tokenizer_report.json").read_text())
    assert report["round_trip_failures"] == 0 and report["training_texts"] == 6000 and report["kind"] == "bpe"


def test_unigram_tokenizer_round_trips_its_corpus(tmp_path):
    tokenizer, count = train(CORPUS, kind="unigram", vocab_size=200)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLES[:2] + list(iter_texts(CORPUS))[:100]:
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert count == 6000 and loaded.pad_token_id != loaded.eos_token_id


def test_digits_can_be_merged_and_bad_input_is_an_error(tmp_path):
    tokenizer, _ = train(CORPUS, vocab_size=400, split_digits=False)
    assert any(len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit() for t in tokenizer.get_vocab())
    with pytest.raises(DataError, match="no such corpus"):
        train(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        train(bad)
