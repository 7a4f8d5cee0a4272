"""The trained tiny SFT policy exported and run by its consumers: llama.cpp for GGUF, plain transformers for int8.

Slow: it trains the demo SFT checkpoint (the session's `sft_run`, minutes).  Needs the export extra
(gguf, llama-cpp-python, torchao); skipped without it, except under CI, which installs it.
"""

from __future__ import annotations

import pytest

from alignment.tools import export as ex
from alignment.tools import gguf_export
from tests.tools.test_export import needs

pytestmark = pytest.mark.slow
HELD_OUT = 50


@pytest.fixture(scope="module")
def roundtrip(sft_run, tmp_path_factory, repo_root):
    for module in ("gguf", "llama_cpp", "torchao"):
        needs(module)
    import policies

    run_dir, _ = sft_run
    out = tmp_path_factory.mktemp("roundtrip")
    report = ex.export(str(run_dir), out, int8=True, gguf=True, gguf_types=("f32", "q8_0"),
                       eval_data=str(repo_root / "data/tiny_arith/eval.jsonl"), eval_samples=HELD_OUT,
                       speed_prompts=2, speed_tokens=8, speed_repeats=1)
    rows = ex.eval_rows(str(repo_root / "data/tiny_arith/eval.jsonl"), HELD_OUT)
    model, tokenizer = policies.load(str(out), dtype="float32", device="cpu")
    _, fp32_answers = ex.accuracy(model, tokenizer, rows, max_new_tokens=6)
    return out, report, rows, tokenizer, fp32_answers


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_llama_cpp_tokenizes_and_answers_like_transformers(roundtrip, gguf_type):
    from alignment.evaluation.generate import render_prompt

    out, report, rows, tokenizer, fp32_answers = roundtrip
    llama = gguf_export.load_llama(out / "gguf" / f"model-{gguf_type}.gguf")
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    assert [gguf_export.llama_token_ids(llama, t) for t in texts] == [list(tokenizer(t)["input_ids"]) for t in texts]
    answers = gguf_export.chat_answers(llama, [row["prompt"] for row in rows], max_new_tokens=6)
    llama.close()
    same = sum(a == b for a, b in zip(answers, fp32_answers))
    required = 49 if gguf_type == "f32" else int(ex.GGUF_AGREEMENT[gguf_type] * HELD_OUT)
    assert same >= required, f"{gguf_type}: {same} of {HELD_OUT} greedy chat answers identical"
    variant = report["variants"][f"gguf-{gguf_type}"]
    assert variant["identical_token_ids"] == HELD_OUT and variant["identical_greedy_answers"] == same
    assert variant["agreement_ok"] and variant["within_tolerance"]
    assert f"- gguf-{gguf_type}: identical greedy answers: {same} of {HELD_OUT}" in (out / "export_report.md").read_text()


def test_int8_loads_with_plain_from_pretrained_and_agrees_with_fp32(roundtrip):
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report, rows, _, fp32_answers = roundtrip
    model = AutoModelForCausalLM.from_pretrained(str(out / "int8"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "int8"))
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, Int8Tensor)
    _, answers = ex.accuracy(model, tokenizer, rows, max_new_tokens=6)
    same = sum(a == b for a, b in zip(answers, fp32_answers))
    assert same >= 0.9 * HELD_OUT, f"int8: {same} of {HELD_OUT} greedy answers identical to fp32"
    assert report["variants"]["int8"]["identical_greedy_answers"] == same and report["variants"]["int8"]["agreement_ok"]
