# The two commands of the README. Each sets up what it needs first (scripts/setup.sh).
.PHONY: setup demo test bench-smoke

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python -m telepathy.demo

test: setup
	.venv/bin/python -m pytest -q -rs -n 2 --dist loadfile --durations=15

bench-smoke: setup
	.venv/bin/python -m bench.monitor_overhead --smoke
	.venv/bin/python -m bench.memory_model --smoke
	.venv/bin/python -m bench.checkpoint --smoke
