"""Packaging: everything is declared in setup.cfg; this file only ships the job script, the
local-cluster scripts and the configs inside the package.

`slurm/` and `configs/` at the top of the repository stay the files users see and edit. A build
(`pip install .`, a wheel) copies them into `telepathy/_shipped/`, where
`telepathy.core.resources` finds them when telepathy runs from an installed package (no second
copy in git, so nothing can drift).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("slurm", "configs")


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "telepathy" / "_shipped"
        for name in SHIPPED:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / name, target / name,
                            ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithShippedFiles})
