# The two quickstart commands (see README.md). Both set up .venv on first use.
.PHONY: serve test test-fast venv

venv:
	bash scripts/bootstrap.sh

serve: venv
	.venv/bin/minigpt5 serve

test: venv
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# Without a server or a browser (tests/unit and tests/deploy, less the few marked `server`): ~2 minutes.
test-fast: venv
	.venv/bin/python -m pytest -q -m "not server and not browser" $(PYTEST_ARGS)
