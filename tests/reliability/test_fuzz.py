"""Fuzzing the two front doors: recipes and dataset rows/files.

Hundreds of generated malformed recipes (random keys, wrong types, nested
junk, broken YAML, non-UTF-8 bytes, junk overrides) and malformed datasets
(missing fields, wrong types, bad JSON, non-UTF-8, empty, junk rows) are fed to
``alignment.recipe.load`` / ``from_dict`` and ``alignment.data.load_rows`` /
``validate_rows`` / ``load``.  Each either succeeds or ends in the toolkit's
own error type (an ``AlignmentError``) with a message; never another
exception.  The runs are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment import data
from alignment import recipe as recipes
from alignment.errors import AlignmentError, DataError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
WORK = Path(tempfile.mkdtemp(prefix="alignment-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)

# ----------------------------------------------------------------------------- junk values

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "auto", "sft", "dpo", "grpo", "tiny:1m", "1e-4", "nan", "-1", "true", "../..", "\x00"]),
)
keys = st.one_of(
    st.text(min_size=1, max_size=10),
    st.sampled_from(["stage", "model", "data", "train", "options", "reward", "eval", "output_dir", "seed", "resume",
                     "name_or_path", "lora", "r", "dtype", "learning_rate", "beta", "max_steps", "source", "kwargs",
                     "max_samples", "eval_fraction", "rewards", "num_generations", "per_device_train_batch_size"]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(keys, inner, max_size=4)), max_leaves=12)

BASES = {name: yaml.safe_load(open(f"recipes/tiny/{name}.yaml", encoding="utf-8"))
         for name in ("sft", "dpo", "grpo", "pretrain")}


@st.composite
def mutated_recipes(draw):
    """A shipped recipe with a few random edits: junk at a random path, a key removed, a key added."""
    recipe = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 4))):
        node = recipe
        while isinstance(node, dict) and node and draw(st.booleans()):
            child = node[draw(st.sampled_from(sorted(node, key=str)))]
            if not isinstance(child, dict):
                break
            node = child
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and node:
            del node[draw(st.sampled_from(sorted(node, key=str)))]
        elif action == "set" and node:
            node[draw(st.sampled_from(sorted(node, key=str)))] = draw(junk)
        else:
            node[draw(keys)] = draw(junk)
    return recipe


def assert_toolkit_error(call):
    """Run `call`; it may succeed, or raise an AlignmentError with a message; anything else fails the test."""
    try:
        return call()
    except AlignmentError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc


# ----------------------------------------------------------------------------- recipes


@FUZZ
@given(st.one_of(mutated_recipes(), st.dictionaries(keys, junk, max_size=6)))
def test_fuzz_recipe_from_dict_malformed_recipes(raw):
    result = assert_toolkit_error(lambda: recipes.from_dict(raw, recipes.Locations("fuzz.yaml")))
    if isinstance(result, recipes.Recipe):
        result.resolved_yaml()  # a recipe that loads can also be saved


overrides = st.lists(st.one_of(
    st.text(max_size=20),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["train.learning_rate", "model", "model.lora.r", "data",
                                                          "reward.0.source", "stage", "x.y.z", "eval", "", "."]),
              st.text(max_size=10)),
), max_size=3)


@st.composite
def recipe_files(draw):
    """Bytes of a recipe file: a shipped one with random character edits, random text, YAML junk, or raw bytes."""
    kind = draw(st.sampled_from(["edited", "text", "yaml", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "yaml":
        return yaml.safe_dump(draw(junk), allow_unicode=True).encode("utf-8")
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    text = open(f"recipes/tiny/{draw(st.sampled_from(sorted(BASES)))}.yaml", encoding="utf-8").read()
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(["\t", ":", "- ", "{", "]", "&a ", "*a", "!!python/object:os.system ",
                                                     "\n  ", "'", "?", "%", "@", "\x85"])) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
    return text.encode("utf-8")


@FUZZ
@given(recipe_files(), overrides)
def test_fuzz_recipe_load_malformed_files_and_overrides(content, extra):
    path = WORK / "fuzz.yaml"
    path.write_bytes(content)
    assert_toolkit_error(lambda: recipes.load(path, extra))


@pytest.mark.parametrize("text", [
    "a: &x [*x]\n",                        # an alias inside itself
    "stage: sft\n" + "a:\n" * 0 + "[" * 500 + "]" * 500 + "\n",  # absurd nesting
    "--- 1\n--- 2\n",                      # two documents
    "stage: !!python/object/apply:os.system ['true']\n",
    "? [a, b]\n: c\n",                     # a list as a key
])
def test_fuzz_recipe_known_hostile_yaml(text):
    path = WORK / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(AlignmentError):
        recipes.load(path)


def test_fuzz_recipe_path_that_is_a_directory():
    with pytest.raises(AlignmentError, match="cannot read the recipe file"):
        recipes.load(WORK)


# ----------------------------------------------------------------------------- dataset rows

FORMATS = ["text", "sft", "preference", "prompt", "unpaired"]
columns = st.sampled_from(["text", "messages", "prompt", "completion", "chosen", "rejected", "label", "answer", "x"])
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "human", 3]),
                                           "content": st.one_of(st.text(max_size=8), st.integers(), st.none())}),
                    max_size=3)
cell = st.one_of(junk, messages, st.text(max_size=8))
rows = st.lists(st.one_of(st.dictionaries(columns, cell, max_size=5), junk), max_size=6)


@FUZZ
@given(rows, st.sampled_from(FORMATS), st.floats(0, 0.99))
def test_fuzz_validate_rows_malformed_rows(candidate_rows, fmt, max_dropped):
    lines = list(range(1, len(candidate_rows) + 1))
    result = assert_toolkit_error(lambda: data.validate_rows(copy.deepcopy(candidate_rows), lines, fmt, "fuzz.jsonl",
                                                             max_dropped))
    if isinstance(result, tuple):
        kept, report = result
        assert report.rows_kept == len(kept) > 0
        assert_toolkit_error(lambda: data._to_dataset(kept, "fuzz.jsonl"))


@st.composite
def jsonl_files(draw):
    """JSONL bytes: junk rows as JSON, non-object JSON, broken JSON, non-UTF-8 bytes, blank lines."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["row", "row", "value", "broken", "bytes", "blank", "nested"]))
        if kind == "row":
            lines.append(json.dumps(draw(st.dictionaries(columns, cell, max_size=5))).encode())
        elif kind == "value":
            lines.append(json.dumps(draw(junk), allow_nan=True).encode())
        elif kind == "broken":
            lines.append(json.dumps(draw(st.dictionaries(columns, cell, max_size=3))).encode()[:-1])
        elif kind == "bytes":
            lines.append(draw(st.binary(min_size=1, max_size=20)).replace(b"\n", b" "))
        elif kind == "nested":
            lines.append(b"[" * 5000 + b"]" * 5000)
        else:
            lines.append(b"   ")
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))  # an optional UTF-8 byte-order mark
    return prefix + b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))


@FUZZ
@given(jsonl_files(), st.sampled_from(FORMATS), st.one_of(st.none(), st.integers(1, 5)),
       st.sampled_from([0.0, 0.3]))
def test_fuzz_load_malformed_jsonl_files(content, fmt, max_samples, eval_fraction):
    path = WORK / "fuzz.jsonl"
    path.write_bytes(content)
    result = assert_toolkit_error(lambda: data.load_rows(str(path), fmt, max_samples=max_samples))
    if isinstance(result, DataError):
        assert "fuzz.jsonl" in str(result), f"the error must name the file: {result}"
    spec = recipes.DataSpec(train=str(path), max_samples=max_samples, eval_fraction=eval_fraction,
                            max_dropped_fraction=0.5)
    assert_toolkit_error(lambda: data.load(spec, fmt))


@pytest.mark.parametrize("suffix, content", [
    (".json", b'[{"prompt": "a"}, {"prompt": '),
    (".json", b""),
    (".csv", b"prompt,completion\n\xff\xfe,x\n"),
    (".csv", b""),
    (".parquet", b"PAR1 not really parquet"),
    (".jsonl", b"\xef\xbb\xbf{\"prompt\": \"Q?\", \"completion\": \"A\"}\n"),
])
def test_fuzz_other_file_formats(suffix, content):
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(content)
    result = assert_toolkit_error(lambda: data.load_rows(str(path), "sft"))
    if isinstance(result, DataError):
        assert f"fuzz{suffix}" in str(result)
    else:
        assert result[0] == [{"prompt": "Q?", "completion": "A"}]  # the byte-order mark is not part of the row
