# The two commands the README documents. Both install what they need first (scripts/setup.sh).
CORES ?= 2

.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/snakemake --cores $(CORES)

test:
	@bash scripts/setup.sh --test-systems
	.venv/bin/python -m pytest -q
