"""`align export`: clean fp32 directory, int8 (smaller, reloadable without pickle), pruning, LoRA merge, report."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.errors import CheckpointError
from alignment.tools import export as ex

FAST = ["--eval-samples", "16", "--speed-prompts", "2", "--speed-tokens", "4", "--speed-repeats", "1"]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory, repo_root):
    from alignment import cli

    out = tmp_path_factory.mktemp("export")
    status = cli.main(["export", str(tiny_model_dir), "--output", str(out), "--int8", "--prune", "0.3", "--gguf",
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


def test_int8_file_is_smaller_and_reloads_without_pickle(exported, tiny_model_dir):
    import policies

    out, report = exported
    fp32, int8 = report["variants"]["fp32"], report["variants"]["int8"]
    assert int8["file_bytes"] < 0.4 * fp32["file_bytes"]
    assert not list((out / "int8").glob("*.pt")) and (out / "int8" / ex.INT8_WEIGHTS).is_file()
    model, tokenizer = ex.load_int8(out / "int8")
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.ao.nn.quantized.dynamic.Linear)
    reference = ex.quantize_int8(policies.load(str(tiny_model_dir), dtype="float32")[0])
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_report_has_size_speed_and_accuracy_against_fp32(exported):
    out, report = exported
    for name in ("fp32", "int8", "pruned"):
        variant = report["variants"][name]
        assert variant["file_bytes"] > 0 and variant["speed"]["tokens_per_s"] > 0
        assert 0.0 <= variant["accuracy"] <= 1.0
    int8 = report["variants"]["int8"]
    assert int8["tolerance"] == 0.05 and int8["within_tolerance"] == (int8["accuracy_delta"] >= -0.05)
    assert report["eval"]["prompts"] == 16 and report["speed_settings"]["new_tokens"] == 4
    assert report["variants"]["gguf"]["status"] in ("unavailable", "written (experimental)")
    table = (out / "export_report.md").read_text()
    assert "| int8 | model_int8.safetensors |" in table and "within tolerance" in table


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


def test_gguf_unavailable_is_reported_cleanly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "gguf_available", lambda: False)
    report = ex.export(str(tiny_model_dir), tmp_path / "g", gguf=True, eval_data=None, speed_prompts=1,
                       speed_tokens=2, speed_repeats=1)
    assert report["variants"]["gguf"] == {"status": "unavailable",
                                          "note": "the gguf package is not installed (pip install gguf)"}
    assert set(report["variants"]) == {"fp32", "gguf"}


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


def test_unfinished_run_and_foreign_output_folder_are_refused(tiny_model_dir, tmp_path):
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


def test_gguf_writer_names_tensors_as_llama_cpp_does(tiny_model_dir, tmp_path, monkeypatch):
    """The `gguf` package is not installed here: a stand-in records what the writer is given."""
    import sys
    import types

    import policies

    calls: dict = {"tensors": {}, "kv": {}}

    class Writer:
        def __init__(self, path, arch):
            calls["path"], calls["arch"] = path, arch

        def add_tensor(self, name, data):
            calls["tensors"][name] = data.shape

        def __getattr__(self, name):  # add_* metadata and write_* / close
            return lambda *args: calls["kv"].__setitem__(name, args)

    monkeypatch.setitem(sys.modules, "gguf", types.SimpleNamespace(GGUFWriter=Writer))
    model, tokenizer = policies.load(str(tiny_model_dir), dtype="float32")
    ex.write_gguf(model, tokenizer, tmp_path / "model.gguf")
    config = model.config
    assert calls["arch"] == "llama" and "token_embd.weight" in calls["tensors"]
    assert "output.weight" not in calls["tensors"]  # tied: llama.cpp reuses token_embd
    assert calls["tensors"]["blk.0.attn_q.weight"] == (config.hidden_size, config.hidden_size)
    assert len([n for n in calls["tensors"] if n.startswith("blk.3.")]) == 9
    assert calls["kv"]["add_block_count"] == (config.num_hidden_layers,) and "write_tensors_to_file" in calls["kv"]
    assert calls["kv"]["add_eos_token_id"] == (tokenizer.eos_token_id,) and calls["kv"]["add_chat_template"]
    weight = torch.arange(16.0).reshape(4, 4)
    permuted = ex._permute_rope(weight, heads=1)
    assert torch.equal(permuted[:, 0], torch.tensor([0.0, 8.0, 4.0, 12.0]))  # rows interleaved from the two halves
