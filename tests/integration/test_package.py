"""telepathy as an installed package: a wheel built from this tree, installed apart from the
checkout, run from another directory. It carries the job script, the local-cluster scripts and
the configs (copied at build time from slurm/ and configs/, never a second copy in git)."""

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT

SOURCES = ("telepathy", "slurm", "configs", "setup.py", "setup.cfg", "pyproject.toml",
           "README.md", "MANIFEST.in")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site directory, a directory that is not the checkout) after `pip install` of the wheel."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "whl"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp / "whl").glob("telepathy-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return tmp / "site", elsewhere


def run(installed, *args, timeout=120):
    site, elsewhere = installed
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([*args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_the_job_script_cluster_scripts_and_configs(installed):
    site, _ = installed
    shipped = site / "telepathy" / "_shipped"
    for name in ("slurm/preemptible.slurm", "slurm/local/up.sh", "slurm/local/down.sh",
                 "configs/tiny-cpu.yaml", "configs/llama-1b-h100.yaml"):
        assert filecmp.cmp(shipped / name, ROOT / name, shallow=False), name
    out = run(installed, sys.executable, "-c",
              "import telepathy; from telepathy.core import resources; "
              "print(telepathy.__file__); print(resources.job_script())")
    module, script = out.stdout.split()
    assert module.startswith(str(site)) and script == str(shipped / "slurm" / "preemptible.slurm")


def test_the_installed_command_plans_from_another_directory(installed):
    site, _ = installed
    out = run(installed, str(site / "bin" / "telepathy"), "--help")
    assert out.returncode == 0 and "plan" in out.stdout, out.stderr
    out = run(installed, str(site / "bin" / "telepathy"), "plan", "--config",
              str(ROOT / "configs" / "llama-1b-h100.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [o["gpus"] for o in plan["options"]] == [1, 2, 3, 4]
    assert plan["remaining_steps"] == 20000 and plan["options"][0]["memory_gib"] > 1


def test_the_installed_demo_runs_without_slurm_from_another_directory(installed):
    site, elsewhere = installed
    # The shipped config (none in this directory), 60 of its 300 steps: what is checked is
    # that the installed package finds its config and runs, not the length of the run.
    out = run(installed, str(site / "bin" / "telepathy"), "demo", "--local", "--stop-at", "40",
              "--set", "train.steps=60", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "match bit for bit" in out.stdout and (elsewhere / "runs" / "demo").is_dir()
    assert re.search(r"steps \d+-60\) match bit for bit", out.stdout), out.stdout  # 60, not 300
