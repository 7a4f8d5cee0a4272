"""The PPO critic: a value head on the policy, or a separate value network.

Two recipes (``build_critic(kind, ...)``):

* ``"value_head"``: :class:`CausalLMWithValueHead` puts a :class:`ValueHead`
  (one linear layer) on the policy's last hidden state, so one forward pass
  gives logits and values. Saved as the language model's own directory
  plus ``value_head.safetensors``.
* ``"separate"``: :class:`SequenceCritic` is its own network, a
  transformers sequence-classification model with one label whose score
  layer is applied at every position instead of only the last one. It can
  start from the reward model (the reference recipe of Huang et al. 2024)
  or from the policy's weights with a fresh head. Saved as a plain
  transformers directory (``AutoModelForSequenceClassification`` loads it).

Both return per-token values through :func:`per_token_values`; values are
float32, shape ``(batch, seq)`` (or the last ``values_to_keep`` positions).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from policies.errors import CheckpointError

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_KINDS = ("value_head", "separate")

__all__ = [
    "CRITIC_KINDS",
    "VALUE_HEAD_FILE",
    "CausalLMWithValueHead",
    "SequenceCritic",
    "ValueHead",
    "ValueHeadOutput",
    "build_critic",
    "load_safetensors_weights",
    "per_token_values",
]


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on the backbone's last hidden state ``h_t``.

    ``w ~ N(0, 1 / (d + 1))`` (std ``1/sqrt(d+1)``), ``b = 0``: values start
    small (Huang et al. 2024, detail "value head initialisation").
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(hidden_states).squeeze(-1).float()


@dataclass
class ValueHeadOutput:
    """Logits ``(B, T, V)`` and values ``(B, T)`` over the same kept positions."""

    logits: torch.Tensor
    values: torch.Tensor


def _hidden_size(config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


class CausalLMWithValueHead(nn.Module):
    """A causal LM (plain or peft) with a :class:`ValueHead` on its last hidden state."""

    def __init__(self, lm: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.pretrained_model = lm
        self.v_head = value_head if value_head is not None else ValueHead(_hidden_size(lm.config))
        param = next(lm.parameters())
        self.v_head.to(device=param.device)

    @property
    def config(self):
        return self.pretrained_model.config

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        logits_to_keep: int = 0,
        use_cache=False,
        **kwargs,
    ):
        """Logits and values; with ``logits_to_keep=k`` both cover only the last ``k`` positions."""
        out = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            output_hidden_states=True,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.hidden_states[-1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ValueHeadOutput(logits=out.logits, values=self.v_head(hidden))

    def generate(self, *args, **kwargs):
        return self.pretrained_model.generate(*args, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """The LM's own directory (transformers or peft adapter) plus ``value_head.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.pretrained_model.save_pretrained(directory, **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()}
        save_file(state, str(directory / VALUE_HEAD_FILE))

    def load_weights(self, directory) -> None:
        """Load weights saved by :meth:`save_pretrained` into this instance, in place."""
        load_safetensors_weights(self.pretrained_model, directory)
        self.load_value_head(directory)

    def load_value_head(self, directory) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the directory holds no value head")
        self.v_head.load_state_dict(load_file(str(path), device=str(self.v_head.summary.weight.device)))

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> CausalLMWithValueHead:
        """A transformers causal-LM directory; its value head too when the file is there."""
        from transformers import AutoModelForCausalLM

        model = cls(AutoModelForCausalLM.from_pretrained(directory, **kwargs))
        if (Path(directory) / VALUE_HEAD_FILE).is_file():
            model.load_value_head(directory)
        return model


def _score_layer(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    raise ValueError(
        f"{type(model).__name__} has no linear `score` or `classifier` layer; "
        "a separate critic needs a sequence-classification model with one label"
    )


class SequenceCritic(nn.Module):
    """A separate critic: a sequence-classification model (one label) scoring every position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a critic needs num_labels=1, got {model.config.num_labels}")
        self.model = model
        _score_layer(model)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, values_to_keep: int = 0):
        """Values ``(B, T)``; with ``values_to_keep=k`` only for the last ``k`` positions."""
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if values_to_keep:
            hidden = hidden[:, -values_to_keep:]
        head = _score_layer(self.model)
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, directory, **kwargs) -> None:
        """A plain transformers directory, loadable by ``AutoModelForSequenceClassification``."""
        self.model.save_pretrained(directory, **kwargs)

    def load_weights(self, directory) -> None:
        load_safetensors_weights(self.model, directory)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> SequenceCritic:
        """From a reward-model directory, or from a causal-LM directory (fresh score layer)."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, **kwargs)
        return cls(model)

    @classmethod
    def from_model(cls, model: nn.Module) -> SequenceCritic:
        """Wrap a sequence-classification model as is, or copy a causal LM's backbone under a fresh head.

        A fresh head is initialised like :class:`ValueHead` (std ``1/sqrt(d+1)``, bias 0).
        """
        if hasattr(model, "merge_and_unload"):  # a peft model: start from its merged weights
            model = copy.deepcopy(model).merge_and_unload()
        if _has_score_layer(model):
            return cls(model)
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(model.config)
        config.num_labels = 1
        param = next(model.parameters())
        seq = AutoModelForSequenceClassification.from_config(config).to(
            device=param.device, dtype=param.dtype
        )
        src = getattr(model, model.base_model_prefix, model)
        getattr(seq, seq.base_model_prefix).load_state_dict(src.state_dict())
        head = _score_layer(seq)
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(_hidden_size(config) + 1))
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        return cls(seq)


def _has_score_layer(model: nn.Module) -> bool:
    try:
        _score_layer(model)
    except ValueError:
        return False
    return True


def build_critic(kind: str, policy: nn.Module, init_from: nn.Module | None = None):
    """Return ``(policy, critic)`` for a recipe's critic ``kind``.

    ``"value_head"``: ``(CausalLMWithValueHead(policy), None)`` - the policy
    carries its critic. ``"separate"``: ``(policy, SequenceCritic)`` built
    from ``init_from`` (a reward model, the reference recipe) or, when that
    is None, from a copy of the policy's weights with a fresh head.
    """
    if kind == "value_head":
        return CausalLMWithValueHead(policy), None
    if kind == "separate":
        return policy, SequenceCritic.from_model(init_from if init_from is not None else policy)
    raise ValueError(f"critic kind must be one of {CRITIC_KINDS}, got {kind!r}")


def per_token_values(critic: nn.Module, input_ids, attention_mask=None, position_ids=None, values_to_keep=0):
    """Per-token values ``(B, T)`` (or the last ``values_to_keep`` positions) from either critic kind."""
    if isinstance(critic, CausalLMWithValueHead):
        return critic(input_ids, attention_mask, position_ids, logits_to_keep=values_to_keep).values
    return critic(
        input_ids, attention_mask=attention_mask, position_ids=position_ids, values_to_keep=values_to_keep
    )


def load_safetensors_weights(model: nn.Module, directory) -> None:
    """Load ``*.safetensors`` weights written by ``save_pretrained`` into ``model`` in place.

    Handles plain transformers models (all shards; keys absent only because
    they are tied to a loaded weight are fine) and peft models (adapter
    weights). Raises :class:`CheckpointError` on unknown or missing keys.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    files = _weight_files(directory, peft=hasattr(model, "peft_config"))
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise CheckpointError(f"{directory}: adapter keys the model does not have: {unexpected[:5]}")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    untied = [k for k in missing if not _is_tied(model, k, state)]
    if unexpected or untied:
        raise CheckpointError(
            f"{directory} does not match {type(model).__name__}: "
            f"unexpected keys {list(unexpected)[:5]}, missing keys {untied[:5]}"
        )


def _weight_files(directory: Path, peft: bool) -> list[Path]:
    """The safetensors files ``save_pretrained`` wrote: the adapter, one file, or the shards of an index."""
    import json

    if peft:
        candidates = [directory / "adapter_model.safetensors"]
    elif (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        candidates = [directory / name for name in sorted(set(index["weight_map"].values()))]
    else:
        candidates = [directory / "model.safetensors"]
    missing = [p.name for p in candidates if not p.is_file()]
    if missing:
        raise CheckpointError(f"{directory} is missing weight files {missing}")
    return candidates


def _is_tied(model: nn.Module, key: str, loaded: dict) -> bool:
    """True when parameter ``key`` shares storage with a parameter that was loaded."""
    own = model.state_dict()
    ptr = own[key].data_ptr()
    return any(k in loaded and own[k].data_ptr() == ptr for k in own if k != key)
