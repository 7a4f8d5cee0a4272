"""reward/ imports nothing from alignment/ (DESIGN.md's module map), and its errors are the pipeline's."""

import subprocess
import sys

from tests.reward.test_reward_docs import ROOT

PROBE = """
import importlib, pkgutil, sys
import reward
for module in pkgutil.walk_packages(reward.__path__, "reward."):
    importlib.import_module(module.name)
print(sorted(k for k in sys.modules if k == "alignment" or k.startswith("alignment.")))
"""


def test_every_reward_module_imports_without_the_pipeline():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_reward_errors_are_the_pipelines():
    import alignment.errors
    import reward

    assert alignment.errors.RewardError is reward.RewardError
    assert issubclass(reward.RewardError, alignment.errors.AlignmentError)
