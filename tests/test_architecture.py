"""The import rules of docs/architecture.md, checked on the source text.

docs/architecture.md's table "What each part must never import" is read here and every rule in it is checked
against every ``.py`` file of the part, with `ast`: top-level imports, imports inside functions, relative
imports and ``importlib.import_module("...")`` with a literal name all count.  The map and this test therefore
cannot disagree: a rule added to the page is checked, and a rule deleted from it fails
`test_the_page_keeps_the_ground_rules`.

The package rule (no circle between alignment/, reward/ and policies/): policies/ is the ground floor and imports
neither of the others; reward/ may import policies/ (the base error class, networks for reward models); alignment/
imports both; neither imports alignment/.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "architecture.md"
RULES_HEADING = "## What each part must never import"
PACKAGES = ("alignment", "reward", "policies")


def never_rules() -> dict[str, list[str]]:
    """part -> the modules it must never import, from the table under RULES_HEADING (dotted names in backticks)."""
    text = MAP.read_text(encoding="utf-8")
    assert RULES_HEADING in text, f"{MAP} lost its section {RULES_HEADING!r}"
    section = text.split(RULES_HEADING, 1)[1].split("\n## ", 1)[0]
    rules = {}
    for row in re.findall(r"^\|([^\n]*)\|\s*$", section, flags=re.MULTILINE):
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue  # the header and the --- line
        part = cells[0].strip("`").rstrip("/").removesuffix(".py").replace("/", ".")  # alignment/ppo/ -> alignment.ppo
        rules[part] = [name.rstrip("/").replace("/", ".") for name in re.findall(r"`([^`]+)`", cells[1])]
    return rules


def files_of(part: str) -> list[Path]:
    """The .py files of a dotted part: a package (every file under it) or a module."""
    path = ROOT / Path(*part.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    module = path.with_suffix(".py")
    assert module.is_file(), f"{MAP} names {part!r}, which is neither a package nor a module here"
    return [module]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, as absolute dotted names.

    ``from a import b`` counts as both ``a`` and ``a.b`` (b may be a submodule), a relative import is resolved
    against the file's package, and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal count too.
    """
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def is_within(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def violations(part: str, forbidden: list[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {module} ({part} must never import {banned})"
            for path in files_of(part)
            for module in sorted(imported_modules(path))
            for banned in forbidden if is_within(module, banned)]


def test_the_page_keeps_the_ground_rules():
    """The rules this project is built on are on the map (so deleting a row cannot switch its check off)."""
    rules = never_rules()
    assert "alignment" in rules.get("reward", []), rules
    assert {"alignment", "reward"} <= set(rules.get("policies", [])), rules


@pytest.mark.parametrize("part, forbidden", sorted(never_rules().items()))
def test_no_part_imports_what_the_map_forbids(part, forbidden):
    assert violations(part, forbidden) == []


def package_graph() -> dict[str, set[str]]:
    """alignment / reward / policies -> the other two it imports (from any of its files)."""
    graph = {}
    for package in PACKAGES:
        imported = set().union(*(imported_modules(path) for path in files_of(package)))
        graph[package] = {other for other in PACKAGES if other != package
                          and any(is_within(module, other) for module in imported)}
    return graph


def test_no_import_cycle_between_the_packages():
    graph = package_graph()

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in graph[start])

    assert [package for package in PACKAGES if reaches(package, package)] == [], graph


def test_reward_and_policies_import_without_the_pipeline():
    """What the source text says, at run time too: importing them loads no module of alignment/."""
    code = ("import sys, policies, policies.errors, reward, reward.combine; "
            "print(sorted(m for m in sys.modules if m == 'alignment' or m.startswith('alignment.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_pipeline_re_exports_the_same_error_classes():
    """`from alignment.errors import X` keeps working, and names the very class the lower package raises."""
    import alignment.errors
    import policies.errors
    import reward.errors

    for name in ("AlignmentError", "RecipeError", "CheckpointError"):
        assert getattr(alignment.errors, name) is getattr(policies.errors, name)
    assert alignment.errors.RewardError is reward.errors.RewardError
    assert reward.errors.AlignmentError is policies.errors.AlignmentError
    assert issubclass(reward.errors.RewardError, policies.errors.AlignmentError)


# ----------------------------------------------------------------------------- module-level state

# Module-level containers that functions may change, each with the reason it has to be process-wide.  Anything
# else a function writes at module level (a `global` statement, a mutating method call, an item assignment) fails
# test_no_module_level_state_is_written_by_functions: state that outlives a call belongs to an object the caller
# holds (a trainer, a MetricsLog, a decoder), so two runs in one process never see each other's.  Registries are
# the one kind allowed by rule: written only by a top-level function named register* (a decorator run when the
# module defining the entry is imported), read by lookups.
PROCESS_WIDE = {
    ("alignment/checkpoint.py", "_LOCKS"): "the open flock handles of the run directories this process holds: "
                                           "the kernel lock lives exactly as long as the process",
    ("alignment/recipe.py", "SECRET_VALUES"): "secret values read from the environment, scrubbed from every log "
                                              "line of every library (the log record factory is process-wide)",
}
MUTATORS = {"append", "add", "update", "setdefault", "pop", "popitem", "clear", "discard", "extend", "insert",
            "remove"}


def written_module_state(path: Path) -> list[tuple[str, int]]:
    """(name, line) of each module-level name a function of `path` rebinds with `global`, mutates with a
    container method, or assigns an item of."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        module_names |= {t.id for t in targets if isinstance(t, ast.Name)}
    registrations = {id(node) for top in tree.body if isinstance(top, ast.FunctionDef)
                     and top.name.startswith("register") for node in ast.walk(top)}
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(function) in registrations:
            continue
        local = {a.arg for a in function.args.args + function.args.kwonlyargs}
        for node in ast.walk(function):
            if isinstance(node, ast.Global):
                found += [(name, node.lineno) for name in node.names]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in module_names and node.func.value.id not in local:
                found.append((node.func.value.id, node.lineno))
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                found += [(t.value.id, node.lineno) for t in targets if isinstance(t, ast.Subscript)
                          and isinstance(t.value, ast.Name) and t.value.id in module_names
                          and t.value.id not in local]
    return found


def test_no_module_level_state_is_written_by_functions():
    offenders = []
    for package in PACKAGES:
        for path in files_of(package):
            relative = str(path.relative_to(ROOT))
            offenders += [f"{relative}:{line} writes {name}" for name, line in written_module_state(path)
                          if (relative, name) not in PROCESS_WIDE]
    assert offenders == []


def test_the_state_check_finds_each_kind_of_write(tmp_path):
    """The check above must be able to fail: a global rebinding, a container method and an item assignment."""
    sample = tmp_path / "sample.py"
    sample.write_text("CACHE = {}\nSEEN = []\nCURRENT = None\n\n"
                      "def remember(key, value):\n    CACHE[key] = value\n    SEEN.append(key)\n\n"
                      "def switch(value):\n    global CURRENT\n    CURRENT = value\n\n"
                      "def local_only(CACHE):\n    CACHE['x'] = 1\n\n"
                      "def register(name):\n    def decorate(fn):\n        CACHE[name] = fn\n        return fn\n"
                      "    return decorate\n")
    assert sorted(written_module_state(sample)) == [("CACHE", 6), ("CURRENT", 10), ("SEEN", 7)]
