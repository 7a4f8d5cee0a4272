"""docs/rewards.md: the "Plug in your own reward" example works as written."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "rewards.md")


def blocks(lang):
    text = open(DOC).read()
    section = text.split("## Plug in your own reward", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_plug_in_example_runs_and_prints_what_the_doc_says(tmp_path):
    reward_file, script = blocks("python")
    (expected,) = blocks("text")
    (tmp_path / "my_rewards.py").write_text(reward_file)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.strip()
    assert len(reward_file.strip().splitlines()) + len(script.strip().splitlines()) <= 12


def test_recipe_snippet_builds(tmp_path, monkeypatch):
    yaml = __import__("yaml")
    (snippet,) = blocks("yaml")
    reward_file, _ = blocks("python")
    (tmp_path / "my_rewards.py").write_text(reward_file)
    monkeypatch.chdir(tmp_path)
    import reward

    combined = reward.build(yaml.safe_load(snippet)["reward"])
    assert combined.weights == [1.0, 0.2]


def section_yaml(title):
    text = open(DOC).read()
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, flags=re.S)


def test_ecosystem_judge_and_protocol_snippets_build(monkeypatch):
    import pytest

    pytest.importorskip("math_verify")
    yaml = __import__("yaml")
    import reward

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RM_TOKEN", "doc-token")
    snippets = (section_yaml("## Rewards from trl, verl and OpenRLHF") + section_yaml("## LLM judges")
                + section_yaml("### OpenRLHF's and LLaMA-Factory's protocols, both ways"))
    assert len(snippets) == 4
    names = []
    for snippet in snippets:
        combined = reward.build(yaml.safe_load(snippet)["reward"])
        names += combined.names
        combined.close()
    assert names == ["think_format_reward", "accuracy_reward", "get_soft_overlong_punishment", "compute_score",
                     "reward_func", "judge", "remote_10.0.0.5_5000"]


def test_example_sources_build(monkeypatch):
    yaml = __import__("yaml")
    import reward

    monkeypatch.chdir(ROOT)
    with open(os.path.join(ROOT, "examples", "rewards", "sources.yaml")) as f:
        combined = reward.build(yaml.safe_load(f)["reward"])
    try:
        assert combined.names == ["think_format_reward", "get_soft_overlong_punishment", "short_digits",
                                  "compute_score", "reward_func", "openrlhf_rm", "llamafactory_rm", "judge"]
        by_name = dict(zip(combined.names, combined.sources))
        assert by_name["openrlhf_rm"].fn.protocol == "openrlhf" and by_name["openrlhf_rm"].fn.score_path == ""
        assert by_name["llamafactory_rm"].fn.score_path == "/v1/score/evaluation"
        # the functions that need no network score here
        scores = by_name["short_digits"](["What is 1 + 1?"], ["2"], completion_ids=[[5, 2]])
        assert scores == [1.0]
    finally:
        combined.close()
