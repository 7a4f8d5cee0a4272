"""README "Plug in your own reward": the example runs as written and prints what its comment says."""

import re
import subprocess
import sys

from alignment import recipe as recipes


def section(repo_root):
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    return text.split("## Plug in your own reward", 1)[1].split("\n## ", 1)[0]


def test_python_example_prints_its_commented_result(repo_root):
    (code,) = re.findall(r"```python\n(.*?)```", section(repo_root), flags=re.S)
    assert len(code.strip().splitlines()) <= 10
    expected = re.search(r"print\(result\.total\)\s*#\s*(.*)", code).group(1).strip()
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_command_line_override_builds_the_same_rewards(repo_root):
    import reward

    (command,) = re.findall(r"```bash\n(.*?)```", section(repo_root), flags=re.S)
    override = re.search(r'"(reward=.*)"', command).group(1)
    recipe = recipes.load(repo_root / "recipes/tiny/grpo.yaml", [override])
    combined = reward.build([dict(spec) for spec in recipe.reward])
    assert combined.weights == [1.0, 0.1]
