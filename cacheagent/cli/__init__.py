"""The command line: a client of the agent API, plus the offline commands."""
