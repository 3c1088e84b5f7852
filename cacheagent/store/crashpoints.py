"""Fault injection for crash-consistency tests; a no-op in normal operation.

The store calls ``crashpoint(name)`` between the steps of every multi-step change to the disk
(blob commit, tree build, model removal), and so do the pull engine and the CSI driver
(download, publish, unpublish); the tuples below name every step. When the environment variable
``CACHEAGENT_CRASH_AT`` equals ``name`` the process SIGKILLs itself on the spot, so a test
running the store (or the whole agent, tests/faults) in a real subprocess can stop it at exactly
that step and check that the next start repairs whatever it left. Nothing sets the variable
outside tests.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "CACHEAGENT_CRASH_AT"

BLOB_STEPS = (
    "blob.after_verify",
    "blob.after_fsync",
    "blob.after_rename",
    "blob.after_dir_fsync",
    "blob.after_index",
)
TREE_STEPS = (
    "tree.after_link",
    "tree.after_chmod",
    "tree.after_rename",
    "tree.after_dir_fsync",
    "tree.after_index",
)
REMOVE_STEPS = (
    "remove.after_index",
    "remove.after_rename",
    "remove.after_blobs",
)
PULL_STEPS = (
    "pull.after_pending",
    "pull.range_written",
    "pull.ranges_recorded",
    "pull.before_commit",
    "pull.before_tree",
    "pull.after_tree",
)
PUBLISH_STEPS = (
    "publish.after_journal",
    "publish.after_lease",
    "publish.after_bind",
    "publish.after_mount",
)
UNPUBLISH_STEPS = (
    "unpublish.after_unmount",
    "unpublish.after_rmdir",
    "journal.after_release",
)


def crashpoint(name: str) -> None:
    """Kill this process with SIGKILL if the fault-injection variable names this step."""
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
