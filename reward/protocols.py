"""The JSON each HTTP reward protocol carries, both ways: one home for the client and the server.

============  =========================  ===============================================  ==========================
protocol      path                       request                                          response
============  =========================  ===============================================  ==========================
align         ``/score``                 ``{"prompts", "completions", "columns": {..}}``  ``{"scores": [...]}``
openrlhf      ``/get_reward``            ``{"query": [...], "prompts": [...],             ``{"rewards": [...],
                                         "labels": [...]}``                               "scores": [...],
                                                                                          "extra_logs": {...}}``
llamafactory  ``/v1/score/evaluation``   ``{"model": ..., "messages": [...]}``            ``{"scores": [...]}``
============  =========================  ===============================================  ==========================

OpenRLHF's ``query`` is the whole sequence (prompt + completion) as text, its ``prompts`` the prompts, its
``labels`` a dataset column (here the column ``labels``; a spec's ``columns: {labels: answer}`` renames).
LLaMA-Factory's ``reward_model_type: api`` sends each whole sequence as one string of ``messages``; its
``model`` is a name the server may ignore. Every list holds one entry per sample, in order.

Each function raises `ProtocolError` with a message naming the field; the client turns it into a
`RewardError` naming the URL, the server into HTTP 422.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PATHS = {"align": "/score", "openrlhf": "/get_reward", "llamafactory": "/v1/score/evaluation"}
PROTOCOLS = tuple(PATHS)


class ProtocolError(ValueError):
    """A message that does not follow its protocol (a field missing, of the wrong type or length)."""


def _field_list(body: Any, key: str, n: int | None) -> list[Any]:
    if not isinstance(body, Mapping) or key not in body:
        keys = sorted(body) if isinstance(body, Mapping) else type(body).__name__
        raise ProtocolError(f"has no '{key}' field (got {keys})")
    values = body[key]
    if not isinstance(values, list):
        raise ProtocolError(f"'{key}' is a {type(values).__name__}, expected a list")
    if n is not None and len(values) != n:
        raise ProtocolError(f"expected {n} scores, got {len(values)}" if key in ("scores", "rewards")
                            else f"'{key}' holds {len(values)} entries, expected {n}")
    return values


# ------------------------------------------------------------------ client side


def encode_request(protocol: str, prompts: Sequence[str], completions: Sequence[str],
                   columns: Mapping[str, list], model: str = "model") -> dict[str, Any]:
    """The request body for one batch (prompts and completions as text, columns JSON-ready)."""
    if protocol == "openrlhf":
        return {"query": [p + c for p, c in zip(prompts, completions)], "prompts": list(prompts),
                "labels": list(columns.get("labels") or [None] * len(prompts))}
    if protocol == "llamafactory":
        return {"model": model, "messages": [p + c for p, c in zip(prompts, completions)]}
    return {"prompts": list(prompts), "completions": list(completions), "columns": dict(columns)}


def decode_response(protocol: str, body: Any, n: int) -> tuple[list[Any], dict[str, Any]]:
    """(scores, what to log) of a response: OpenRLHF's ``rewards`` and its ``scores``/``extra_logs``."""
    if protocol == "openrlhf":
        rewards = _field_list(body, "rewards", n)
        return rewards, {"scores": body.get("scores"), "extra_logs": body.get("extra_logs") or {}}
    return _field_list(body, "scores", n), {}


# ------------------------------------------------------------------ server side


def decode_request(protocol: str, body: Any) -> tuple[list[Any], list[Any], dict[str, list]]:
    """(prompts, completions, columns) of a request; the columns are OpenRLHF's ``labels`` there."""
    if not isinstance(body, Mapping):
        raise ProtocolError("the body must be a JSON object")
    if protocol == "openrlhf":
        queries = _field_list(body, "query", None)
        prompts = _field_list(body, "prompts", len(queries))
        labels = body.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(queries)):
            raise ProtocolError(f"'labels' must be a list of {len(queries)} values")
        completions = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if not isinstance(query, str) or not isinstance(prompt, str) or not query.startswith(prompt):
                raise ProtocolError(f"query {i} does not start with its prompt: the completion cannot be cut out")
            completions.append(query[len(prompt):])
        return list(prompts), completions, ({"labels": labels} if labels is not None else {})
    if protocol == "llamafactory":
        messages = _field_list(body, "messages", None)
        if not all(isinstance(m, str) for m in messages):
            raise ProtocolError("'messages' must be a list of strings (each a whole sequence)")
        return [""] * len(messages), list(messages), {}  # a whole sequence each: no prompt to tell apart
    unknown = sorted(set(body) - {"prompts", "completions", "columns"})
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown}; expected 'prompts', 'completions', 'columns'")
    prompts = _field_list(body, "prompts", None)
    completions = _field_list(body, "completions", None)
    if len(prompts) != len(completions):
        raise ProtocolError(f"{len(prompts)} prompts but {len(completions)} completions")
    columns = body.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise ProtocolError("'columns' must be an object of lists")
    for key, values in columns.items():
        if not isinstance(values, list) or len(values) != len(prompts):
            raise ProtocolError(f"column '{key}' must be a list of {len(prompts)} values")
    return prompts, completions, dict(columns)


def encode_response(protocol: str, scores: list[Any]) -> dict[str, Any]:
    """The response body for the scores (None: does not apply, sent as null)."""
    if protocol == "openrlhf":
        return {"rewards": scores, "scores": scores, "extra_logs": {}}
    return {"scores": scores}
