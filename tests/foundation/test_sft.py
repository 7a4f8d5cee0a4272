import json

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete, read_json
from alignment.errors import CheckpointError

FAST = ["train.max_steps=4", "train.logging_steps=2", "train.save_steps=2", "data.max_samples=256",
        "eval.max_samples=16", "train.per_device_train_batch_size=8"]


def sft_trainer_batch(tiny_tokenizer, rows):
    import datasets
    from trl import SFTConfig, SFTTrainer

    import policies

    model, _ = policies.load("tiny:1m")
    args = SFTConfig(output_dir="/tmp/unused-sft", bf16=False, use_cpu=True, report_to="none", max_steps=1,
                     per_device_train_batch_size=len(rows))
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tiny_tokenizer)
    return next(iter(trainer.get_train_dataloader()))


def test_eos_is_trained_on_and_prompt_is_masked(tiny_tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "completion": [{"role": "assistant", "content": "3"}]},
        {"prompt": [{"role": "user", "content": "What is 10 + 20?"}], "completion": [{"role": "assistant", "content": "30"}]},
    ]
    batch = sft_trainer_batch(tiny_tokenizer, rows)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = [int(t) for t, label in zip(ids, labels) if label != -100]
        answer = tiny_tokenizer.decode(trained[:-1])
        assert trained[-1] == eos, "the end-of-turn token must carry a label"
        assert answer in ("3", "30")  # only the completion (and its EOS) is trained on
        assert pad not in trained


def test_messages_format_trains_assistant_turn_with_eos(tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]}] * 2
    batch = sft_trainer_batch(tiny_tokenizer, rows)
    labels = [int(t) for t in batch["labels"][0] if t != -100]
    assert tiny_tokenizer.eos_token_id in labels


def test_short_sft_run_writes_a_complete_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.stages import sft

    recipe = recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}"])
    initial = {k: v.clone() for k, v in __import__("policies").load("tiny:1m", seed=recipe.seed)[0].state_dict().items()}
    metrics = sft.run(recipe)
    assert is_complete(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    changed = [k for k, v in model.state_dict().items() if k in initial and not torch.equal(v, initial[k])]
    assert changed, "training must change the parameters"
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    info = read_json(tmp_path / "run_info.json")
    assert info["stage"] == "sft" and info["complete"] and info["versions"]["trl"]
    assert info["data"]["data/tiny_arith/sft.jsonl"] and info["tokenizer"] and info["chat_template"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= saved["after"]["greedy_accuracy"] <= 1.0 and "sampled_accuracy" in saved["after"]
    assert (tmp_path / "recipe.yaml").read_text().startswith("stage: sft")
    assert (tmp_path / "metrics.jsonl").read_text().count("loss") >= 2


def test_resume_continues_from_last_checkpoint(tmp_path):
    from alignment.stages import sft

    sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}", "train.max_steps=2"]))
    assert (tmp_path / "checkpoints/checkpoint-2").is_dir()
    metrics = sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}", "resume=true"]))
    assert metrics["train_steps"] == 4
    assert is_complete(tmp_path)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    from alignment.stages import sft

    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}", "resume=true"]))


@pytest.mark.slow
def test_tiny_sft_recipe_beats_the_untrained_model(sft_run):
    out, metrics = sft_run
    saved = json.loads((out / "metrics.json").read_text())
    before, after = saved["before"]["greedy_accuracy"], saved["after"]["greedy_accuracy"]
    assert before < 0.05
    # the seed study's claim (README): >= 45% greedy on every seed; the demonstrations' own ceiling is ~55%
    assert after >= 0.45, (before, after)
    assert saved["after"]["greedy_eos_rate"] > 0.9  # the model learned to stop


def test_resume_with_changed_hyperparameters_is_refused_unless_forced(tmp_path):
    from alignment.errors import RecipeError
    from alignment.stages import sft

    sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}", "train.max_steps=2"]))
    changed = FAST + [f"output_dir={tmp_path}", "resume=true", "train.learning_rate=1e-4"]
    with pytest.raises(RecipeError, match="changed since it started: train.learning_rate"):
        sft.run(recipes.load("recipes/tiny/sft.yaml", changed))
    forced = sft.run(recipes.load("recipes/tiny/sft.yaml", changed[:-2] + ["resume=force", "train.learning_rate=1e-4"]))
    assert forced["train_steps"] == 4


def test_output_dir_escaping_the_working_folder_is_refused(tmp_path):
    from alignment.errors import RecipeError
    from alignment.stages import sft

    with pytest.raises(RecipeError, match="outside"):
        sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + ["output_dir=../../escaped"]))


def test_sigterm_finishes_the_step_saves_and_resume_completes(tmp_path, repo_root):
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "alignment.cli", "run", "recipes/tiny/sft.yaml", f"output_dir={tmp_path}",
            "train.max_steps=100000", "train.save_steps=100000", "data.max_samples=256", "eval.max_samples=8",
            "train.per_device_train_batch_size=8", "train.logging_steps=1", "options.evaluate_before=false"]
    proc = subprocess.Popen(args, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    from alignment.guards import EXIT_INTERRUPTED

    assert proc.returncode == EXIT_INTERRUPTED, output  # saved and resumable, but not finished: not 0
    assert "interrupted" in output and "--resume" in output
    assert not is_complete(tmp_path)
    checkpoint = max((tmp_path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at >= 3
    from alignment.stages import sft

    resumed = sft.run(recipes.load("recipes/tiny/sft.yaml", FAST + [f"output_dir={tmp_path}", "resume=true",
                                                                     "options.evaluate_before=false",
                                                                     f"train.max_steps={stopped_at + 2}"]))
    assert resumed["train_steps"] == stopped_at + 2 and is_complete(tmp_path)


def test_nested_trainer_settings_survive_the_checkpoint_pickle(tmp_path):
    """train.lr_scheduler_kwargs is a mapping: transformers pickles it into every checkpoint."""
    from alignment.stages import sft

    recipe = recipes.load("recipes/tiny/sft.yaml", FAST + [
        f"output_dir={tmp_path}", "options.evaluate_before=false", "eval=null",
        "train.lr_scheduler_type=cosine_with_min_lr", "train.lr_scheduler_kwargs={min_lr: 1.0e-5}"])
    metrics = sft.run(recipe)
    assert is_complete(tmp_path) and (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    assert metrics["train_steps"] == 4
