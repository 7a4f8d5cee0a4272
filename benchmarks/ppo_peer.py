"""The PPO peer: trl 1.12.0's ``trl.experimental.ppo.PPOTrainer``, run inside ``benchmarks/.peer-venv-trl112``.

    benchmarks/.peer-venv-trl112/bin/python -m benchmarks.ppo_peer --assets-json A.json --steps 4 --result R.json

Same saved models as ours (policy, reference = a second copy of the policy,
reward and value model = the saved sequence classifier), the same prompts
(``rl_prompts.jsonl`` rendered with the chat template, left padded), batch 8
(one mini-batch), 32 response tokens, 4 PPO epochs, fp32 or bf16 (``--precision``:
``bf16=True`` plus ``ACCELERATE_MIXED_PRECISION``, see ``run``), temperature 0.7,
``kl_coef`` 0.05, learning rate 3e-6 (trl's defaults, and ours).  Changed from
trl's defaults: ``gradient_checkpointing=False``,
``use_cpu=True``, ``report_to="none"``, ``stop_token="eos"`` (ours always cuts
responses after the EOS) and ``num_sample_generations=0`` (trl would otherwise
print sample completions ten times inside the timed loop).

Imports only torch, transformers, datasets and trl 1.12.0 (plus
``benchmarks.measure`` / ``benchmarks.workloads``, which import nothing heavy).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

from benchmarks.workloads import PPO_SETTINGS, ppo_prompts


def run(assets: dict, steps: int, workdir: str, peer_set: dict | None = None, precision: str = "fp32") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.measure import METER, matmul_parameters, summarise

    set_seed(42)
    policy_dir, reward_dir = assets["policy"], assets["reward"]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    rows = [
        {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]}
        for row in ppo_prompts(tokenizer)
    ]
    dataset = Dataset.from_list(rows)
    batch = PPO_SETTINGS["batch_size"]
    settings = dict(
        output_dir=str(Path(workdir) / "peer-ppo"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // PPO_SETTINGS["mini_batch_size"],
        num_ppo_epochs=PPO_SETTINGS["ppo_epochs"],
        response_length=PPO_SETTINGS["max_new_tokens"],
        temperature=PPO_SETTINGS["temperature"],
        kl_coef=PPO_SETTINGS["kl_coef"],
        learning_rate=PPO_SETTINGS["learning_rate"],
        total_episodes=steps * batch,
        stop_token="eos",
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        seed=42,
        bf16=precision == "bf16",  # the precision our side runs (benchmarks --precision)
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
    )
    settings.update(peer_set or {})
    config = PPOConfig(**settings)
    # trl 1.12.0 builds its own Accelerator() without a precision: accelerate then reads it from
    # ACCELERATE_MIXED_PRECISION, which transformers 4.x's TrainingArguments exported for bf16=True and
    # transformers 5.x no longer does (it only reads the variable). Without this the peer ran fp32 when asked for
    # bf16 (measured: the same CPU seconds as its fp32 run). Setting it is what trl 1.12 relied on; the mixed
    # precision the peer's accelerator really ran is checked below and recorded.
    wanted = "bf16" if config.bf16 else "no"
    os.environ["ACCELERATE_MIXED_PRECISION"] = wanted
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        train_dataset=dataset, value_model=value, eval_dataset=None,
    )
    ran = str(trainer.accelerator.mixed_precision)
    if ran != wanted:
        raise RuntimeError(f"the peer's accelerator runs mixed precision {ran!r}, asked for {wanted!r}")
    METER.begin(trainer.model, tokenizer.pad_token_id)
    trainer.train()
    METER.finish()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    return summarise(
        METER,
        samples=trainer.state.global_step * batch,
        matmul_params=matmul_parameters(policy),
        metric=("objective/scores", scores[-1] if scores else None),
        settings={**{k: v for k, v in settings.items() if k != "output_dir"}, "mixed_precision": ran},
        extra={"steps": trainer.state.global_step},
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets-json", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--peer-set", default="{}", help="JSON dict of extra PPOConfig settings")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                       ("TRL_EXPERIMENTAL_SILENCE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    from benchmarks.measure import write_result

    assets = json.loads(Path(args.assets_json).read_text())
    try:
        result = run(assets, args.steps, args.workdir, json.loads(args.peer_set), args.precision)
        result["status"] = "ok"
    except Exception as exc:
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    write_result(args.result, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
