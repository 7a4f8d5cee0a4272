import subprocess
import sys

import pytest


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_lists_commands_with_examples(repo_root):
    out = run_cli("--help", cwd=repo_root)
    assert out.returncode == 0
    assert "run" in out.stdout and "validate" in out.stdout and "examples:" in out.stdout


def test_validate_shipped_recipes(repo_root):
    out = run_cli("validate", "recipes", cwd=repo_root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout


def test_validate_misspelt_key_names_file_line_and_fix(repo_root, tmp_path):
    text = (repo_root / "recipes/tiny/sft.yaml").read_text().replace("learning_rate:", "learnin_rate:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "learnin_rate" in text_line)
    out = run_cli("validate", str(bad), cwd=repo_root)
    assert out.returncode == 1
    assert f"bad.yaml:{line}" in out.stdout and "did you mean 'learning_rate'" in out.stdout


def test_run_with_bad_override_is_a_clean_error(repo_root):
    out = run_cli("run", "recipes/tiny/sft.yaml", "train.lerning_rate=1", cwd=repo_root)
    assert out.returncode == 2
    assert "error:" in out.stderr and "did you mean 'learning_rate'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("load, preset, expected", [
    (5.0, None, "PASSIVE"),    # busy: idle threads must sleep
    (0.3, None, None),         # quiet: libgomp's default (spinning) is faster
    (5.0, "ACTIVE", "ACTIVE"),  # the user's choice always wins
])
def test_openmp_wait_policy_follows_the_machine_load(load, preset, expected, monkeypatch):
    from alignment import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if preset:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    cli.set_openmp_wait_policy()
    assert cli.os.environ.get("OMP_WAIT_POLICY") == expected
