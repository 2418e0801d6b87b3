# The two quickstart commands (see README.md). Both set up .venv on first use.
.PHONY: serve test venv

venv:
	bash scripts/bootstrap.sh

serve: venv
	.venv/bin/minigpt5 serve

test: venv
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
