# The commands people run. `make demo` and `make test` set everything up first.
UV_VERSION := 0.13.9
UV := .tools/bin/uv
RUN := $(UV) run --frozen

.PHONY: setup demo image test lint typecheck format bench clean

$(UV):
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

setup: $(UV)
	$(UV) sync --frozen --all-groups --compile-bytecode
	npm ci --no-audit --no-fund --loglevel=error

demo: setup
	$(RUN) python -m scripts.demo

# The Docker image built and the demo run with the daemon inside it (buildah, root).
image: setup
	$(RUN) python -m scripts.image

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check daemon

typecheck: setup
	$(RUN) mypy

test: lint typecheck
	$(RUN) pytest

format: setup
	$(RUN) ruff format daemon tests
	$(RUN) ruff check --fix .

bench: setup
	$(RUN) python -m benchmarks.run

clean:
	rm -rf .venv .tools node_modules demo-run bench-results .pytest_cache .mypy_cache .ruff_cache
