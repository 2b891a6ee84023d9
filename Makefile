# The two commands of the README. Both set everything up from this repo's own files.
#   make quickstart   # the main job: the quickstart study (every arm trained, evaluated, compared)
#   make test         # the test suite (what CI runs)
.PHONY: setup test quickstart

setup:
	@bash scripts/setup.sh

# .venv/bin first on PATH, as in an activated environment: every process of the session, Ray's workers included,
# then runs the environment's ninja, and DeepSpeed's op is built once (raypack.train.extensions).
test: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/python -m pytest -q --durations=30

quickstart: setup
	.venv/bin/raypack study jobs/quickstart.yaml
