"""The reward_model stage: a few steps on a handful of rows, a complete run directory that is a reward source."""

import json
import math

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete, read_json
from alignment.errors import DataError, RecipeError

RECIPE = "recipes/tiny/reward_model.yaml"
FAST = ["train.max_steps=4", "train.per_device_train_batch_size=8", "train.logging_steps=1", "train.save_steps=2",
        "train.learning_rate=1.0e-3", "train.max_length=24", "options.center_samples=8",
        "options.score_batch_size=8"]
LONG_ANSWER = "1" * 30  # 30 digit tokens: prompt + answer longer than max_length=24


def rows_from(path, n):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """tiny:1m (seed 42) saved as a causal-LM checkpoint: the stage starts from it as from an SFT policy."""
    import policies

    model, tokenizer = policies.load("tiny:1m", seed=42)
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, repo_root):
    """22 training pairs (2 of them too long for max_length=24) and 16 held-out pairs."""
    folder = tmp_path_factory.mktemp("pairs")
    train = rows_from(repo_root / "data/tiny_arith/preference.jsonl", 20)
    for row in train[:2]:
        train.append({**row, "rejected": [{"role": "assistant", "content": LONG_ANSWER}]})
    held_out = rows_from(repo_root / "data/tiny_arith/preference_eval.jsonl", 16)
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "eval.jsonl", held_out)


def short_recipe(model_dir, out, pair_files, *extra):
    train, held_out = pair_files
    return recipes.load(RECIPE, FAST + [f"model.name_or_path={model_dir}", f"output_dir={out}",
                                        f"data.train={train}", f"data.eval={held_out}",
                                        "data.max_dropped_fraction=0.2", *extra])


@pytest.fixture(scope="module")
def short_run(tiny_lm_dir, pair_files, tmp_path_factory):
    """4 steps from the tiny LM, centred on the starting policy's own samples."""
    from alignment.stages import reward_model

    out = tmp_path_factory.mktemp("rm_run")
    metrics = reward_model.run(short_recipe(tiny_lm_dir, out, pair_files, "options.center_max_new_tokens=4"))
    return out, metrics


def test_short_run_trains_and_writes_a_complete_run_directory(short_run, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, metrics = short_run
    assert is_complete(out)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert math.isfinite(metrics["train_loss"]) and metrics["train_steps"] == 4
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    assert AutoTokenizer.from_pretrained(out).chat_template
    start = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).model.state_dict()
    trained = model.model.state_dict()
    changed = [name for name, value in trained.items() if not torch.equal(value, start[name])]
    assert changed, "training must change the body's parameters"
    info = read_json(out / "run_info.json")
    assert info["stage"] == "reward_model" and info["parent"]["model"] == str(tiny_lm_dir)
    saved = read_json(out / "metrics.json")
    assert saved["heldout"]["pairs"] == 16 and 0.0 <= saved["heldout"]["preference_accuracy"] <= 1.0
    assert math.isfinite(saved["heldout"]["reward_margin"])
    assert (out / "recipe.yaml").read_text().startswith("stage: reward_model")
    assert any("accuracy" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_pairs_longer_than_max_length_are_counted(short_run):
    _, metrics = short_run
    train_report, eval_report = metrics["data"]
    assert train_report["rows_read"] == 22 and train_report["rows_kept"] == 20
    assert train_report["longer_than_max_length"] == 2
    assert train_report["dropped"] == {"chosen or rejected longer than max_length=24 tokens": 2}
    assert eval_report["longer_than_max_length"] == 0 and eval_report["rows_kept"] == 16
    assert "2 training pairs longer than max_length dropped" in metrics["summary"]


def test_too_many_too_long_pairs_fail_the_run(tiny_lm_dir, pair_files, tmp_path):
    from alignment.stages import reward_model

    recipe = short_recipe(tiny_lm_dir, tmp_path, pair_files, "data.max_dropped_fraction=0.05")
    with pytest.raises(DataError, match=r"2 of 22 pairs dropped .*max_length=24"):
        reward_model.run(recipe)
    assert not is_complete(tmp_path)


def test_run_directory_is_a_reward_source_centred_on_the_policy(short_run, pair_files):
    import reward
    from reward.model import RewardModel

    out, metrics = short_run
    config = read_json(out / "reward_config.json")
    assert config["use_chat_template"] is True
    assert config["bias"] == pytest.approx(metrics["reward_bias"]) and math.isfinite(config["bias"])
    assert metrics["centering"]["samples"] == 8 and str(out) not in metrics["centering"]["on"]
    combined = reward.build([{"source": str(out)}])
    held_out = rows_from(pair_files[1], 16)
    prompts = [row["prompt"] for row in held_out]
    chosen = combined(prompts, [row["chosen"] for row in held_out]).total
    rejected = combined(prompts, [row["rejected"] for row in held_out]).total
    assert all(math.isfinite(s) for s in chosen + rejected)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy == pytest.approx(metrics["heldout"]["preference_accuracy"])  # what a scoring stage sees
    raw = RewardModel(str(out), bias=0.0)(prompts, [row["chosen"] for row in held_out])
    assert chosen == pytest.approx([s - config["bias"] for s in raw], abs=1e-5)  # the bias is applied by default


def test_centring_on_chosen_answers_gives_them_mean_zero(tiny_lm_dir, pair_files, tmp_path):
    from alignment.stages import reward_model
    from reward.model import RewardModel

    recipe = short_recipe(tiny_lm_dir, tmp_path, pair_files, "options.center_policy=null", "train.max_steps=2",
                          "options.center_samples=100")
    metrics = reward_model.run(recipe)
    assert metrics["centering"]["on"] == "the chosen answers of 22 training pairs"
    train = rows_from(pair_files[0], 22)
    scores = RewardModel(str(tmp_path))([r["prompt"] for r in train], [r["chosen"] for r in train])
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4)


def test_standard_text_pairs_are_scored_as_plain_text(tiny_lm_dir, tmp_path, repo_root):
    from alignment.stages import reward_model
    from reward.model import RewardModel

    def plain(row):
        return {"prompt": f"Q: {row['prompt'][0]['content']}\nA:", "chosen": " " + row["chosen"][0]["content"],
                "rejected": " " + row["rejected"][0]["content"]}

    train = [plain(r) for r in rows_from(repo_root / "data/tiny_arith/preference.jsonl", 16)]
    held_out = [plain(r) for r in rows_from(repo_root / "data/tiny_arith/preference_eval.jsonl", 8)]
    files = (write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", held_out))
    metrics = reward_model.run(short_recipe(tiny_lm_dir, tmp_path / "rm", files, "train.max_steps=2",
                                            "options.center=false", "options.center_policy=null"))
    assert metrics["reward_bias"] is None and metrics["heldout"]["pairs"] == 8
    rm = RewardModel(str(tmp_path / "rm"))
    assert not rm.use_chat_template and rm.bias == 0.0
    assert rm.text(train[0]["prompt"], train[0]["chosen"]) == train[0]["prompt"] + train[0]["chosen"] + "<|im_end|>"


def test_settings_that_cannot_work_are_refused_before_loading_a_model(tmp_path):
    from alignment.stages import reward_model

    out = f"output_dir={tmp_path}"
    with pytest.raises(RecipeError, match="eval: the reward_model stage generates nothing"):
        reward_model.run(recipes.load(RECIPE, [out, "eval={data: data/tiny_arith/eval.jsonl}"]))
    with pytest.raises(RecipeError, match="center_policy is set but options.center is false"):
        reward_model.run(recipes.load(RECIPE, [out, "options.center=false"]))
    with pytest.raises(RecipeError, match="a random model, not a policy"):
        reward_model.run(recipes.load(RECIPE, [out, "model.name_or_path=tiny:1m"]))
    with pytest.raises(RecipeError, match="unknown key 'centre'"):
        recipes.load(RECIPE, ["options.centre=true"])
    assert not (tmp_path / "run_info.json").exists()


def test_head_learning_rate_trains_the_score_head_in_a_group_of_its_own(tiny_lm_dir, pair_files, tmp_path,
                                                                        monkeypatch):
    from alignment.stages import reward_model

    groups = []
    original = reward_model.use_head_learning_rate

    def spy(trainer, head_lr):
        original(trainer, head_lr)
        groups.extend((len(group["params"]), group["lr"]) for group in trainer.optimizer.param_groups)

    monkeypatch.setattr(reward_model, "use_head_learning_rate", spy)
    recipe = short_recipe(tiny_lm_dir, tmp_path, pair_files, "train.max_steps=2", "options.center_policy=null",
                          "options.head_learning_rate=0.01")
    metrics = reward_model.run(recipe)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_steps"] == 2
    assert (1, 0.01) in groups  # score.weight alone, at its own rate
    assert all(lr == pytest.approx(1.0e-3) for n, lr in groups if (n, lr) != (1, 0.01))  # the body: train.learning_rate
    assert metrics["train_cpu_seconds"] >= 0 and metrics["total_seconds"] >= metrics["train_seconds"]
    with pytest.raises(RecipeError, match="head_learning_rate must be > 0"):
        reward_model.run(short_recipe(tiny_lm_dir, tmp_path / "bad", pair_files, "options.head_learning_rate=0"))


def test_starts_from_a_tiny_preset(tmp_path, pair_files):
    from alignment.stages import reward_model

    recipe = short_recipe("tiny:1m", tmp_path, pair_files, "train.max_steps=1", "options.center_policy=null")
    metrics = reward_model.run(recipe)
    assert is_complete(tmp_path) and math.isfinite(metrics["train_loss"])


# The target is 0.85; the tiny recipe (2,000 steps of 16 pairs from preference_rm.jsonl, score head at 3e-3, body
# at 4e-4) measured 0.882 with seed 42 (0.850 and 0.866 with seeds 1 and 2; docs/rewards.md). The floor catches a
# broken stage or recipe; the test below holds the target.
MIN_HELDOUT_ACCURACY = 0.86  # 0.882 measured, less 0.02


@pytest.fixture(scope="module")
def tiny_recipe_run(sft_run, tmp_path_factory):
    """The real recipe from the session's SFT checkpoint, as `align run recipes/tiny/reward_model.yaml` runs it."""
    from alignment.stages import reward_model

    sft_dir, _ = sft_run
    out = tmp_path_factory.mktemp("rm_tiny_recipe")
    return out, reward_model.run(recipes.load(RECIPE, [f"model.name_or_path={sft_dir}", f"output_dir={out}"]))


@pytest.mark.slow
def test_tiny_recipe_reaches_its_measured_heldout_accuracy_and_is_a_reward_source(tiny_recipe_run):
    import reward

    out, metrics = tiny_recipe_run
    heldout = metrics["heldout"]
    assert heldout["pairs"] == 500
    assert heldout["preference_accuracy"] >= MIN_HELDOUT_ACCURACY, metrics["summary"]
    assert heldout["reward_margin"] > 0
    assert metrics["data"][0]["longer_than_max_length"] == 0
    assert math.isfinite(metrics["reward_bias"]) and metrics["centering"]["samples"] == 256
    combined = reward.build([{"source": str(out)}])
    prompt = [{"role": "user", "content": "What is 17 + 25?"}]
    scores = combined([prompt, prompt], ["42", "32"]).total  # right answer vs the forgotten carry
    assert scores[0] > scores[1]


@pytest.mark.slow
def test_tiny_recipe_reaches_85_percent_heldout_preference_accuracy(tiny_recipe_run):
    _, metrics = tiny_recipe_run
    assert metrics["heldout"]["preference_accuracy"] >= 0.85, metrics["summary"]
