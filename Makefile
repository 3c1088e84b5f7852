# The two commands: `make demo` runs the agent's main job, `make test` runs the tests.
# Both set up everything they need first (scripts/bootstrap.sh is idempotent).
.PHONY: setup demo test lint bench protos clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/python scripts/demo.py

lint: setup
	.venv/bin/ruff check cacheagent tests bench scripts
	.venv/bin/ruff format --check cacheagent tests bench scripts
	.venv/bin/mypy
	.venv/bin/lint-imports

test: lint
	.venv/bin/python -m pytest -q -ra $(PYTEST_ARGS)

# Benchmarks (not part of `make test`): each prints a table with the machine's figures.
# (bench/fuse.py includes the lazy rows of bench/lazy.py.)
BENCHES = store pull api csi fuse prefetch fleet soak
bench: setup
	@for b in $(BENCHES); do echo "== bench/$$b.py"; .venv/bin/python bench/$$b.py || exit 1; done

protos:
	.venv/bin/python scripts/gen_protos.py --force

clean:
	rm -rf .venv cacheagent/_proto .pytest_cache .mypy_cache .ruff_cache
