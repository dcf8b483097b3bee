"""The house: rooms that import downwards only, pure modules that touch nothing, no import
cycle, every room saying what it owns and may import, docs/layout.md matching the tree,
and one `telepathy` command."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from telepathy import cli
from telepathy.core import resources
from tests.support import ROOT

PACKAGE = ROOT / "telepathy"
ROOMS = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
LINT = Path(sys.executable).with_name("lint-imports")
LAYOUT_PAGE = ROOT / "docs" / "layout.md"


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(tree / "setup.cfg"), "--no-cache"],
                          cwd=tree, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory):
    """A copy of the package and its contracts, to break on purpose."""
    def make(name):
        tree = tmp_path_factory.mktemp(name)
        shutil.copytree(PACKAGE, tree / "telepathy", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "setup.cfg", tree)
        return tree
    return make


def test_the_layering_contract_holds():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("plan/placement.py", "import torch", "Pure modules touch nothing"),
    ("slurm/policy.py", "import os", "Pure modules touch nothing"),
    ("checkpoint/manifest.py", "from ..train import trainer", "Rooms import downwards only"),
    ("watch/runview.py", "from ..core import jsonl", "Pure modules touch nothing"),
    ("checkpoint/manager.py", "import deepspeed", "DeepSpeed is imported by the engine alone"),
    ("train/phases.py", "import subprocess", "Programs run through telepathy.core.proc alone"),
])
def test_the_layering_contract_fails_when_broken(tree_copy, module, line, broken):
    tree = tree_copy(module.replace("/", "-"))
    path = tree / "telepathy" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    out = lint_imports(tree)
    assert out.returncode != 0, out.stdout
    text = " ".join(out.stdout.split())
    assert f"{broken}" in text and "BROKEN" in text
    assert "telepathy." + module.removesuffix(".py").replace("/", ".") in text


PURE = [line.strip() for line in (ROOT / "setup.cfg").read_text().split(
    "[importlinter:contract:pure]")[1].split("forbidden_modules")[0].splitlines()
    if line.strip().startswith("telepathy.")]
FILE_IO = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "exists", "is_file",
           "is_dir", "iterdir", "glob", "rglob", "mkdir", "unlink", "stat", "rename", "replace",
           "touch", "rmdir", "resolve"}
"""Path.absolute() is allowed: RunPaths.at reads the working directory, no file."""


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_touch_no_file(module):
    """What an import contract cannot see: the builtin open() and Path methods that do I/O."""
    import ast

    path = ROOT / (module.replace(".", "/") + ".py")
    calls = [(node.lineno, name) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call)
             and (name := getattr(node.func, "attr", getattr(node.func, "id", None))) in FILE_IO]
    assert not calls, f"{module} does I/O at (line, call): {calls}"


def test_no_import_cycle_between_modules():
    import grimp

    graph = grimp.build_graph("telepathy")
    modules = sorted(m for m in graph.modules if m.startswith("telepathy"))
    state: dict[str, int] = {}

    def visit(m, chain):
        state[m] = 1
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if not n.startswith("telepathy") or state.get(n) == 2:
                continue
            assert state.get(n) != 1, f"import cycle: {' -> '.join(chain + [m, n])}"
            visit(n, chain + [m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_what_it_owns_and_may_import(room):
    import importlib

    doc = importlib.import_module(f"telepathy.{room}").__doc__ or ""
    assert len(doc.split()) > 15 and "May import:" in doc, f"telepathy/{room}/__init__.py"


def layout_tree() -> dict[str, set[str]]:
    """docs/layout.md's code block as {room: the names in its first column} ("": package modules)."""
    text = LAYOUT_PAGE.read_text()
    block = text[text.index("# Layout\n"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    tree: dict[str, set[str]] = {"": set()}
    room = ""
    for line in block.splitlines():
        match = re.match(r"^( *)(\S.*?)(?:\s{2,}|$)", line)
        if not match or not 2 <= len(match.group(1)) <= 6:
            continue  # a top-level folder, or a description's continuation line
        indent, names = len(match.group(1)), match.group(2)
        tokens = [t.strip("/") for t in re.split(r"[ ,|]+", names) if t]
        if names.endswith("/"):
            if len(tokens) == 1:
                room = tokens[0]
                tree.setdefault(room, set())
        elif indent == 2 and names.endswith(".py"):
            tree[""].add(names)
        else:
            tree[room].update(tokens)
    return tree


def test_the_layout_page_names_every_room_and_module():
    tree = layout_tree()
    for room in ROOMS:
        assert room in tree, f"docs/layout.md misses telepathy/{room}/"
        for module in sorted((PACKAGE / room).glob("*.py")):
            if module.name not in ("__init__.py", "__main__.py"):
                assert module.stem in tree[room], f"docs/layout.md misses {room}/{module.name}"
    for module in PACKAGE.glob("*.py"):
        if module.name not in ("__init__.py", "__main__.py"):
            assert module.name in tree[""], f"docs/layout.md misses telepathy/{module.name}"


def test_one_command_with_a_subcommand_per_room(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0 and f"telepathy {name}" in capsys.readouterr().out


def test_in_a_checkout_the_shipped_files_are_the_repositorys_own():
    assert resources.job_script() == ROOT / "slurm" / "preemptible.slurm"
    assert resources.local_cluster_scripts() == ROOT / "slurm" / "local"
    assert resources.config("tiny-cpu.yaml") == ROOT / "configs" / "tiny-cpu.yaml"


def test_demo_refuses_bad_overrides_before_starting_anything(tmp_path, capsys):
    from telepathy import demo

    root = tmp_path / "demo"
    assert demo.main(["--local", "--root", str(root), "--set", "train.steps=eight"]) == 2
    assert "train.steps='eight' has the wrong type" in capsys.readouterr().out
    assert demo.main(["--local", "--root", str(root), "--set", "train.steps=30",
                      "--stop-at", "40"]) == 2
    assert "--stop-at 40 is not before the run's last step (train.steps=30)" in \
        capsys.readouterr().out
    assert not root.exists()
