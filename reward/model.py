"""A learned reward model (a sequence-classification checkpoint) as a reward source.

The score of a sample is the model's single output read at the **last real
token** of the sample, found from the attention mask (never from the model's
own pad-token lookup, which reads the wrong position when pad == eos or with
left padding). Position ids are computed from the mask too, so a sample scores
the same alone, left-padded or right-padded in a batch.

torch and transformers are imported inside functions: ``import reward`` stays light.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from reward.base import completion_text, is_conversation, prompt_text
from reward.errors import RewardError

logger = logging.getLogger(__name__)


class RewardModel:
    """Score (prompt, completion) pairs with a local sequence-classification model.

    Args:
        path: a directory with ``config.json``, safetensors weights and a tokenizer.
        device: "cpu", "cuda", "cuda:1", ...; default: cuda if available, else cpu.
        batch_size: samples per forward pass.
        max_length: token limit; a longer sample keeps its last ``max_length``
            tokens (the completion's end, where the score is read), is counted in
            ``self.truncated`` and logged. Default: no limit.
        bias: subtracted from every score (centre the reward, e.g. on the SFT
            policy's mean). None (default): the ``bias`` in the directory's
            ``reward_config.json`` (written by the reward-model stage) when
            present, else 0.0.
        use_chat_template: None (default) = ``reward_config.json``'s
            ``use_chat_template`` when present (the format the model was trained
            on), else use the tokenizer's chat template when it has one (prompt
            as the user message, completion as the assistant message); False =
            always plain ``prompt + completion``.
        append_eos: on the plain-text path, append the eos token when the text
            does not end with it (as trl's RewardTrainer does for standard data).
        padding_side: "left" or "right"; default: the tokenizer's.
        dtype: torch dtype name ("float32", "bfloat16", ...) or None (float32).
        trust_remote_code: off unless asked for.

    Conversational prompts are scored with their whole conversation on the
    chat-template path (``accepts_conversations = True``).
    """

    accepts_conversations = True

    def __init__(
        self,
        path: str,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        bias: float | None = None,
        use_chat_template: bool | None = None,
        append_eos: bool = True,
        padding_side: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise RewardError(f"reward model '{path}': no config.json, so not a model directory")
        with open(config_path) as f:
            config = json.load(f)
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise RewardError(
                f"reward model '{path}': architecture {archs} is not a sequence-classification model "
                "(train one with the reward-model stage)"
            )
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
        if num_labels != 1:
            raise RewardError(
                f"reward model '{path}': expected a single-score head (num_labels=1), found {num_labels}"
            )
        if batch_size < 1:
            raise RewardError(f"reward model '{path}': batch_size must be >= 1, got {batch_size}")
        if padding_side not in (None, "left", "right"):
            raise RewardError(
                f"reward model '{path}': padding_side must be 'left' or 'right', got {padding_side!r}"
            )

        self.path = path
        defaults = read_reward_config(path)
        if bias is None:
            bias = defaults.get("bias", 0.0)
        if use_chat_template is None:
            use_chat_template = defaults.get("use_chat_template")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )
        except Exception as exc:
            raise RewardError(f"reward model '{path}': loading failed: {type(exc).__name__}: {exc}") from exc
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            raise RewardError(f"reward model '{path}': the tokenizer has no pad token")
        if padding_side:
            self.tokenizer.padding_side = padding_side
        if getattr(self.model.config, "pad_token_id", None) is None:
            # transformers refuses batches > 1 without it; we never use its pad lookup for the score
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        import inspect

        self._takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        self.batch_size = batch_size
        self.max_length = max_length
        self.bias = float(bias)
        self.use_chat_template = (
            bool(self.tokenizer.chat_template) if use_chat_template is None else use_chat_template
        )
        if self.use_chat_template and not self.tokenizer.chat_template:
            raise RewardError(
                f"reward model '{path}': use_chat_template=True but the tokenizer has no chat template"
            )
        self.append_eos = append_eos
        self.truncated = 0
        pool_at_last_real_token(self.model)  # the rule reward-model training uses too

    def __repr__(self) -> str:
        return f"RewardModel({self.path!r}, device={str(self.device)!r}, bias={self.bias})"

    # -- text building ---------------------------------------------------

    def text(self, prompt: Any, completion: Any) -> str:
        """The exact string scored for one pair."""
        if self.use_chat_template:
            history = (
                list(prompt)
                if is_conversation(prompt)
                else [{"role": "user", "content": prompt_text(prompt)}]
            )
            reply = (
                list(completion)
                if is_conversation(completion)
                else [{"role": "assistant", "content": completion_text(completion)}]
            )
            return self.tokenizer.apply_chat_template(history + reply, tokenize=False)
        text = prompt_text(prompt) + completion_text(completion)
        eos = self.tokenizer.eos_token
        if self.append_eos and eos and not text.endswith(eos):
            text += eos
        return text

    def _encode(self, text: str) -> list[int]:
        # The chat template writes its own special tokens; plain text gets the tokenizer's (e.g. bos).
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            self.truncated += 1
            logger.warning(
                "reward model '%s': a sample of %d tokens keeps its last %d (max_length)",
                self.path,
                len(ids),
                self.max_length,
            )
            ids = ids[-self.max_length :]
        if not ids:
            raise RewardError(f"reward model '{self.path}': a sample tokenised to zero tokens")
        return ids

    # -- scoring ---------------------------------------------------------

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        texts = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                texts.append(self.text(p, c))
            except Exception as exc:
                raise RewardError(
                    f"reward model '{self.path}': sample {i}: building its text failed: {exc}"
                ) from exc
        return self.score_texts(texts)

    def score_texts(self, texts: list[str]) -> list[float]:
        """Scores of already-built texts, in order, minus ``bias``."""
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [self._encode(t) for t in texts[start : start + self.batch_size]]
            out.extend(self._score_ids(batch))
        return out

    def _score_ids(self, batch: list[list[int]]) -> list[float]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            mask[row, span] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if self._takes_position_ids else {}

        with torch.inference_mode():  # pooled at the last real token (pool_at_last_real_token)
            output = self.model(input_ids=input_ids, attention_mask=mask, **extra)
        scores = output.logits[:, 0]
        return [float(s) - self.bias for s in scores.float().cpu()]


REWARD_CONFIG = "reward_config.json"
_REWARD_CONFIG_TYPES = {"bias": (int, float), "use_chat_template": (bool,)}


def read_reward_config(path: str) -> dict[str, Any]:
    """Scoring defaults saved beside a trained reward model (``reward_config.json``); {} when absent.

    Keys read: ``bias`` (a finite number, subtracted from every score) and
    ``use_chat_template`` (true/false: the format the model was trained on).
    Other keys (provenance such as ``centered_on``) are ignored. Explicit
    constructor arguments win over these defaults.
    """
    import math

    file = os.path.join(path, REWARD_CONFIG)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise RewardError(f"reward model '{path}': {REWARD_CONFIG} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise RewardError(f"reward model '{path}': {REWARD_CONFIG} must hold a JSON object")
    out = {}
    for key, kinds in _REWARD_CONFIG_TYPES.items():
        if config.get(key) is None:
            continue
        value = config[key]
        if not isinstance(value, kinds) or (kinds != (bool,) and isinstance(value, bool)):
            raise RewardError(f"reward model '{path}': {REWARD_CONFIG}: {key} has the wrong type: {value!r}")
        if key == "bias" and not math.isfinite(value):
            raise RewardError(f"reward model '{path}': {REWARD_CONFIG}: bias must be finite, got {value!r}")
        out[key] = value
    return out


def pool_at_last_real_token(model: Any) -> Any:
    """Make a decoder sequence classifier return its score at the last position whose attention mask is 1.

    The one pooling rule of the toolkit, used by reward-model training (the stage's trainer) and by
    :class:`RewardModel` scoring.  transformers' own rule reads the last token that is not the pad
    token: when pad == EOS (GPT-2, Pythia) that is the token *before* the closing EOS, while the mask
    rule reads the EOS itself, so training one rule and serving the other scores a different token.

    The instance's ``forward`` is wrapped (under peft, the base model's: LoRA calls ``forward``
    directly, so a module hook on the model would not fire); the per-token scores come from a hook on
    the ``score`` head at call time (peft may have replaced it by a wrapper).  Models without a
    per-token ``score`` head (encoder classifiers pool their own first token) are left as they are.
    """
    import functools

    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.forward, "pools_at_last_real_token", False) or not hasattr(inner, "score"):
        return model
    original = inner.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        captured: dict[str, Any] = {}
        hook = inner.score.register_forward_hook(lambda _m, _i, out: captured.__setitem__("logits", out))
        try:
            output = original(*args, **kwargs)
        finally:
            hook.remove()
        per_token, mask = captured.get("logits"), kwargs.get("attention_mask")
        if per_token is not None and per_token.dim() == 3 and mask is not None:
            rows = torch.arange(per_token.shape[0], device=per_token.device)
            output.logits = per_token[rows, last_token_index(mask).to(per_token.device)]
        return output

    forward.pools_at_last_real_token = True
    inner.forward = forward
    return model


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last position whose mask is 1, per row; works for left and right padding.

    idx_b = max{t : mask[b, t] = 1}, computed as argmax of mask[b, t] * (t + 1).
    """
    import torch

    positions = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=-1)
