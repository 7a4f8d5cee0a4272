"""`align export`: clean fp32 directory, torchao int8 that from_pretrained loads, pruning, LoRA merge, GGUF, report."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from alignment.errors import CheckpointError, DataError
from alignment.tools import export as ex
from alignment.tools import gguf_export

FAST = ["--eval-samples", "16", "--speed-prompts", "2", "--speed-tokens", "4", "--speed-repeats", "1"]


def needs(module: str):
    """Skip without `module`, except under CI (which installs the export extra): there it must be there."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI installs it with pip install -e '.[export]'")
        pytest.skip(f"{module} is not installed (pip install -e '.[export]')")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None or bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory, repo_root):
    from alignment import cli

    out = tmp_path_factory.mktemp("export")
    optional = (["--int8"] if has("torchao") else []) + (["--gguf", "--gguf-types", "f32,q8_0"] if has("gguf") else [])
    status = cli.main(["export", str(tiny_model_dir), "--output", str(out), "--prune", "0.3", *optional,
                       "--eval-data", str(repo_root / "data/tiny_arith/eval.jsonl"), *FAST])
    assert status == 0
    return out, json.loads((out / "export_report.json").read_text())


def test_fp32_export_is_a_clean_transformers_directory(exported, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported
    names = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt")) for n in names)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    source = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_int8_export_loads_with_plain_from_pretrained(exported, tiny_model_dir):
    needs("torchao")
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForCausalLM

    out, report = exported
    fp32, int8 = report["variants"]["fp32"], report["variants"]["int8"]
    assert int8["file_bytes"] < 0.4 * fp32["file_bytes"]
    assert not list((out / "int8").glob("*.pt")) and not list((out / "int8").glob("*.bin"))
    config = json.loads((out / "int8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    model = AutoModelForCausalLM.from_pretrained(str(out / "int8"))
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    source = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[2, 265, 264, 224, 21, 260, 224, 22, 34]])
    with torch.inference_mode():
        quantized, reference = model(ids).logits, source(ids).logits
    # int8 weights and activations: close to fp32, not equal to it
    assert 0 < (quantized - reference).abs().max() < 0.05 * reference.abs().max()


def test_report_has_size_speed_accuracy_and_agreement_against_fp32(exported):
    out, report = exported
    names = ["fp32", "pruned"] + (["int8"] if "int8" in report["variants"] else [])
    for name in names:
        variant = report["variants"][name]
        assert variant["file_bytes"] > 0 and variant["speed"]["tokens_per_s"] > 0
        assert 0.0 <= variant["accuracy"] <= 1.0
    pruned = report["variants"]["pruned"]
    assert pruned["tolerance"] == 0.05 and pruned["within_tolerance"] == (pruned["accuracy_delta"] >= -0.05)
    assert pruned["identical_greedy_answers_of"] == 16 and 0 <= pruned["identical_greedy_answers"] <= 16
    assert report["eval"]["prompts"] == 16 and report["speed_settings"]["new_tokens"] == 4
    table = (out / "export_report.md").read_text()
    assert "| pruned | model.safetensors | transformers |" in table and "within tolerance" in table
    assert f"- pruned: identical greedy answers: {pruned['identical_greedy_answers']} of 16" in table


def test_pruning_is_global_permanent_and_leaves_embeddings(exported, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, report = exported
    assert report["variants"]["pruned"]["linear_weight_sparsity"] == pytest.approx(0.3, abs=0.01)
    pruned = AutoModelForCausalLM.from_pretrained(str(out / "pruned"))
    source = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert not any("weight_orig" in k or "weight_mask" in k for k in pruned.state_dict())
    assert torch.equal(pruned.model.embed_tokens.weight, source.model.embed_tokens.weight)
    shares = [float((m.weight == 0).float().mean()) for n, m in pruned.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert max(shares) > min(shares)  # global: layers lose different shares


def test_gguf_files_and_modelfile_are_written_and_reported(exported):
    needs("gguf")
    out, report = exported
    for gguf_type in ("f32", "q8_0"):
        variant = report["variants"][f"gguf-{gguf_type}"]
        assert (out / "gguf" / f"model-{gguf_type}.gguf").is_file() and variant["pre_tokenizer"] == "smollm"
        assert variant["add_bos"] is False and variant["engine"] == "llama.cpp"
    assert report["variants"]["gguf-q8_0"]["tensor_types"] == {"Q8_0": 29, "F32": 9}  # 4 layers x 7 + embedding
    assert report["variants"]["gguf-q8_0"]["size_vs_fp32"] < 0.3
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_unavailable_is_reported_cleanly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "gguf_available", lambda: False)
    report = ex.export(str(tiny_model_dir), tmp_path / "g", gguf=True, eval_data=None, speed_prompts=1,
                       speed_tokens=2, speed_repeats=1)
    assert report["variants"]["gguf"] == {"status": "unavailable",
                                          "note": f"the gguf package is not installed ({ex.EXTRA_HINT})"}
    assert set(report["variants"]) == {"fp32", "gguf"}


def test_int8_without_torchao_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "torchao_available", lambda: False)
    with pytest.raises(CheckpointError, match=r"--int8 needs torchao.*\.\[export\]"):
        ex.export(str(tiny_model_dir), tmp_path / "i", int8=True, eval_data=None)
    assert not (tmp_path / "i").exists()
    with pytest.raises(DataError, match="--gguf-types.*q4_k"):
        ex.export(str(tiny_model_dir), tmp_path / "g", gguf=True, gguf_types=("f32", "q4_k"), eval_data=None)


def test_lora_adapter_is_merged_into_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import policies

    base, tokenizer = policies.load(str(tiny_model_dir), dtype="float32")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a fresh adapter is a no-op; make it change the outputs
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    with torch.inference_mode():
        expected = peft_model(ids).logits

    with pytest.raises(CheckpointError, match="--merge-lora"):
        ex.load_source(str(adapter))
    ex.export(str(adapter), tmp_path / "merged", merge_lora=True, base=str(tiny_model_dir), eval_data=None,
              speed_prompts=1, speed_tokens=2, speed_repeats=1)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in merged.state_dict())
    with torch.inference_mode():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)


def test_unfinished_run_foreign_folder_and_old_int8_exports_are_refused(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text('{"complete": false}')
    with pytest.raises(CheckpointError, match="unfinished"):
        ex.load_source(str(run))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an earlier export"):
        ex.export(str(tiny_model_dir), foreign, eval_data=None)
    old = tmp_path / "old_int8"
    old.mkdir()
    (old / "quantization.json").write_text("{}")
    (old / "model_int8.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"old_int8 is an int8 export in the old torch\.ao format"):
        ex.load_any(str(old))
