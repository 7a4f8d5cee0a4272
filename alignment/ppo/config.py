"""Configuration of our PPO trainer, validated before anything heavy is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from alignment.guards import DEFAULT_MAX_KL_PER_SEQUENCE, DEFAULT_MIN_ENTROPY, DEFAULT_MIN_EOS_RATE

__all__ = ["PPOConfig", "SettingError"]


class SettingError(ValueError):
    """A PPOConfig value the trainer cannot run with; `key` names the setting, so a recipe error points at its line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class PPOConfig:
    """Hyper-parameters of :class:`alignment.ppo.trainer.PPOTrainer`.

    Defaults follow Huang et al. 2024 ("N+ implementation details") and
    Ziegler et al. 2019 where they give one. Sizes are per process.
    """

    # optimisation
    learning_rate: float = 3e-6
    critic_learning_rate: float | None = None  # None: same as learning_rate
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    lr_scheduler_type: str = "linear"  # "linear" (decay to 0 over total_steps) or "constant"

    # batch layout: one step = batch_size prompts -> ppo_epochs passes of
    # minibatches; one optimizer update = mini_batch_size x gradient_accumulation_steps samples
    batch_size: int = 64
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    total_steps: int = 100  # rollout batches; total_episodes overrides it when set
    total_episodes: int | None = None

    # generation
    max_new_tokens: int = 64
    # prompts per generate call, each call's sampling seeded from (seed, step, global index of its first
    # prompt): the rollouts then do not depend on how many processes share the batch (a divisor of
    # batch_size; tests/scaleout). None: one call per process on the global RNG stream.
    generation_chunk_size: int | None = None
    temperature: float = 0.7  # used for sampling and for every log-prob (0.7..1.0 typical)
    # vLLM sampling (alignment.ppo.vllm_rollout, on trl's VLLMGeneration; needs a CUDA GPU and vllm): the
    # policy's weights are pushed into vLLM before every rollout, the log-probs PPO uses are still our own
    # forward pass. False: transformers' generate (KV-cached).
    use_vllm: bool = False
    vllm_mode: str = "colocate"  # "colocate" (in this process, on the training GPU) or "server" (trl vllm-serve)
    vllm_gpu_memory_utilization: float = 0.3  # colocate: share of the GPU vLLM takes (weights + KV cache)
    vllm_server_base_url: str | None = None  # server: e.g. "http://localhost:8000" (None: http://0.0.0.0:8000)
    vllm_max_model_length: int | None = None  # colocate: vLLM's context length (None: the model config's)

    # rewards and KL
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0  # per-sequence KL the adaptive controller aims for
    horizon: int = 10000
    kl_estimator: str = "k1"  # estimator inside the per-token reward: k1, k2 or k3
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None  # score given, instead of the reward, to a response with no EOS

    # advantages and losses (alignment.ppo.advantages: the registries and their equations)
    advantage_estimator: str = "gae"  # gae (learned critic), grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline
    policy_loss: str = "ppo_clip"  # ppo_clip, dual_clip, gspo
    # samples of each prompt per rollout, consecutive in the batch (group estimators need >= 2);
    # batch_size counts samples, so a step sees batch_size / num_generations prompts
    num_generations: int = 1
    # where the KL to the reference acts: "reward" (-kl_coef * KL_t in every token's reward, Ziegler et al.)
    # or "loss" (kl_coef * KL estimate added to the policy loss, GRPO's way); kl_estimator picks k1/k2/k3
    kl_in: str = "reward"
    # how the per-token policy loss is reduced: token_mean, sequence_mean or constant (Dr. GRPO);
    # None: the estimator's own (token_mean, grpo: sequence_mean, dr_grpo: constant)
    loss_aggregation: str | None = None
    dual_clip: float = 3.0  # policy_loss dual_clip: the cap c on the ratio for negative advantages (> 1)
    # update forward passes pack each micro-batch's sequences into rows without padding to the longest
    # (block-diagonal attention); same loss and gradients up to float rounding; needs sdpa/eager attention
    pack_updates: bool = False
    # the log-prob passes (policy, reference) and the update's forward/backward run each group of samples
    # of one prompt as one packed row [prompt | response_1 | ... | response_k]: the prompt is computed once
    # per group, the logits only where they predict a response token; same loss and gradients up to float
    # rounding (tests/ppo/test_shared_prompt.py); needs sdpa/eager attention, else the padded pass runs
    share_prompt: bool = True
    # generate prefills each distinct prompt once and copies its KV cache to the group's rows
    share_prefill: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1

    # run
    seed: int = 42
    logging_steps: int = 10
    # experiment trackers that receive every metrics.jsonl record: "none", or any of tensorboard, wandb,
    # mlflow, trackio (a list, or one name); the same key the trl stages hand to transformers
    report_to: str | list[str] = "none"

    # health (None disables a check); the defaults fire only on a collapsed run (alignment.guards)
    max_kl: float | None = DEFAULT_MAX_KL_PER_SEQUENCE  # objective/kl (per sequence) above this
    min_entropy: float | None = DEFAULT_MIN_ENTROPY  # objective/entropy (per token) below this
    min_eos_rate: float | None = DEFAULT_MIN_EOS_RATE  # val/eos_rate below this
    min_response_length: float | None = None  # val/response_length below this
    warn_or_stop: str = "warn"  # "warn" or "stop" (raise TrainingError)
    max_nonfinite_updates: int = 3  # raise TrainingError after this many skipped updates in a row

    def __post_init__(self):
        self._check_positive(
            "learning_rate", "adam_eps", "temperature", "cliprange", "cliprange_value", "target_kl"
        )
        self._check_positive_int(
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "total_steps",
            "max_new_tokens",
            "horizon",
            "logging_steps",
            "max_nonfinite_updates",
        )
        self._check_non_negative("kl_coef", "vf_coef", "weight_decay")
        for key in ("critic_learning_rate", "max_grad_norm"):
            if getattr(self, key) is not None:
                self._check_positive(key)
        if self.total_episodes is not None:
            self._check_positive_int("total_episodes")
        if self.generation_chunk_size is not None:
            self._check_positive_int("generation_chunk_size")
            if self.batch_size % self.generation_chunk_size:
                raise SettingError("batch_size", f"PPOConfig.batch_size ({self.batch_size}) must be divisible by "
                                   f"generation_chunk_size ({self.generation_chunk_size})")
        self._check_vllm()
        for key in ("gamma", "lam"):
            self._check_range(key, 0.0, 1.0)
        for key in ("max_kl", "min_entropy", "min_eos_rate", "min_response_length", "missing_eos_penalty"):
            if getattr(self, key) is not None:
                self._check_number(key)
        self._check_choice("lr_scheduler_type", ("linear", "constant"))
        self._check_choice("warn_or_stop", ("warn", "stop"))
        self._check_choice("kl_estimator", ("k1", "k2", "k3"))
        self._check_algorithm()
        per_update = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % per_update:
            raise SettingError(
                "batch_size",
                f"PPOConfig.batch_size ({self.batch_size}) must be divisible by mini_batch_size x "
                f"gradient_accumulation_steps ({self.mini_batch_size} x {self.gradient_accumulation_steps} = {per_update})"
            )

    # ------------------------------------------------------------ derived

    @property
    def num_steps(self) -> int:
        """Rollout steps of the whole run (from ``total_episodes`` when set)."""
        if self.total_episodes is not None:
            return max(1, self.total_episodes // self.batch_size)
        return self.total_steps

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per rollout step."""
        return self.ppo_epochs * self.batch_size // (self.mini_batch_size * self.gradient_accumulation_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PPOConfig keys: {unknown}")
        return cls(**values)

    @property
    def estimator(self):
        """The :class:`alignment.ppo.advantages.EstimatorSpec` of ``advantage_estimator``."""
        from alignment.ppo.advantages import estimator_spec

        return estimator_spec(self.advantage_estimator)

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or self.estimator.aggregation

    # ------------------------------------------------------------ checks

    def _check_algorithm(self) -> None:
        """The estimator, loss, KL placement and group size: names from the registries, sizes that fit."""
        from alignment.ppo.advantages import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

        self._check_choice("advantage_estimator", tuple(sorted(ADVANTAGE_ESTIMATORS)))
        self._check_choice("policy_loss", tuple(sorted(POLICY_LOSSES)))
        self._check_choice("kl_in", ("reward", "loss"))
        if self.loss_aggregation is not None:
            self._check_choice("loss_aggregation", LOSS_AGGREGATIONS)
        for key in ("pack_updates", "share_prompt", "share_prefill"):
            if not isinstance(getattr(self, key), bool):
                raise SettingError(key, f"PPOConfig.{key} must be true or false, got {getattr(self, key)!r}")
        self._check_positive_int("num_generations")
        if self._check_number("dual_clip") <= 1:
            raise SettingError("dual_clip", f"PPOConfig.dual_clip must be > 1, got {self.dual_clip!r}")
        if self.estimator.grouped and self.num_generations < 2:
            raise SettingError("num_generations", f"PPOConfig.advantage_estimator {self.advantage_estimator!r} "
                               "compares the samples of one prompt: set num_generations >= 2 "
                               f"(got {self.num_generations})")
        if self.batch_size % self.num_generations:
            raise SettingError("batch_size", f"PPOConfig.batch_size ({self.batch_size}) counts samples and must be "
                               f"divisible by num_generations ({self.num_generations})")

    def _check_vllm(self) -> None:
        """The vLLM settings' values (whether this machine can run vLLM is checked by the trainer)."""
        if not isinstance(self.use_vllm, bool):
            raise SettingError("use_vllm", f"PPOConfig.use_vllm must be true or false, got {self.use_vllm!r}")
        self._check_choice("vllm_mode", ("colocate", "server"))
        if isinstance(self.vllm_gpu_memory_utilization, bool) or not (
            isinstance(self.vllm_gpu_memory_utilization, (int, float)) and 0 < self.vllm_gpu_memory_utilization <= 1
        ):
            raise SettingError("vllm_gpu_memory_utilization", "PPOConfig.vllm_gpu_memory_utilization must be in "
                               f"(0, 1], got {self.vllm_gpu_memory_utilization!r}")
        if self.vllm_server_base_url is not None and not (
            isinstance(self.vllm_server_base_url, str) and self.vllm_server_base_url.startswith(("http://", "https://"))
        ):
            raise SettingError("vllm_server_base_url", "PPOConfig.vllm_server_base_url must be an http(s) URL such "
                               f"as http://localhost:8000, got {self.vllm_server_base_url!r}")
        if self.vllm_max_model_length is not None:
            self._check_positive_int("vllm_max_model_length")
        if self.use_vllm and self.vllm_server_base_url is not None and self.vllm_mode != "server":
            raise SettingError("vllm_server_base_url", "PPOConfig.vllm_server_base_url is set but vllm_mode is "
                               "'colocate' (vLLM in this process): set vllm_mode: server to use the server")
        if self.use_vllm and self.generation_chunk_size is not None:
            raise SettingError("generation_chunk_size", "PPOConfig.generation_chunk_size seeds transformers' "
                               "sampling per chunk; vLLM samples on its own RNG, so it cannot be combined with "
                               "use_vllm: unset one of them")

    def _check_number(self, key: str) -> float:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingError(key, f"PPOConfig.{key} must be a finite number, got {value!r}")
        return value

    def _check_positive(self, *keys: str) -> None:
        for key in keys:
            if self._check_number(key) <= 0:
                raise SettingError(key, f"PPOConfig.{key} must be > 0, got {getattr(self, key)!r}")

    def _check_non_negative(self, *keys: str) -> None:
        for key in keys:
            if self._check_number(key) < 0:
                raise SettingError(key, f"PPOConfig.{key} must be >= 0, got {getattr(self, key)!r}")

    def _check_positive_int(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SettingError(key, f"PPOConfig.{key} must be a positive integer, got {value!r}")

    def _check_range(self, key: str, low: float, high: float) -> None:
        value = self._check_number(key)
        if not low <= value <= high:
            raise SettingError(key, f"PPOConfig.{key} must be in [{low}, {high}], got {value!r}")

    def _check_choice(self, key: str, choices: tuple) -> None:
        if getattr(self, key) not in choices:
            raise SettingError(key, f"PPOConfig.{key} must be one of {choices}, got {getattr(self, key)!r}")
