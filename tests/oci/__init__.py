"""Test tooling that writes OCI layouts and pushes them to a registry: used by the tests, the
benchmarks and scripts/demo.py, never by the agent (so it is not in the runtime package)."""
