# The two commands of the README. Each sets up what it needs first (scripts/setup.sh).
.PHONY: setup demo test bench-smoke

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/telepathy demo

# Lint (ruff), the layering contract (import-linter, setup.cfg), then the tests:
# tests/unit (pure, milliseconds), tests/integration (real processes), tests/slurm (the real cluster).
test: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q -rs -n 4 --dist load --no-loadscope-reorder --durations=15

bench-smoke: setup
	.venv/bin/python -m bench.monitor_overhead --smoke
	.venv/bin/python -m bench.memory_model --smoke
	.venv/bin/python -m bench.checkpoint --smoke
	.venv/bin/python -m bench.checkpoint --smoke --peer dcp
	.venv/bin/python -m bench.train_step --smoke --peer deepspeed
	.venv/bin/python -m bench.finetune --smoke
	.venv/bin/python -m bench.sft --smoke
	.venv/bin/python -m bench.track_overhead --smoke
	.venv/bin/python -m bench.startup --smoke
	.venv/bin/python -m bench.mirror --smoke
	.venv/bin/python -m bench.chaos --smoke --workdir runs/chaos-smoke
