# The two quickstart commands (see README.md). Both set up .venv on first use.
.PHONY: serve test test-fast lint venv

venv:
	bash scripts/bootstrap.sh

serve: venv
	.venv/bin/minigpt5 serve

test: venv
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# Without a server or a browser (tests/unit and tests/deploy, less the few marked `server`): ~2 minutes.
test-fast: venv
	.venv/bin/python -m pytest -q -m "not server and not browser" $(PYTEST_ARGS)

# ruff's lint and format check and mypy's type check of the three packages (all configured in pyproject.toml);
# CI runs it before the tests.
lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
