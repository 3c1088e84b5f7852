"""The crash, fault and abuse suite: a real agent process killed, starved and lied to.

Every case asserts the same three things: nothing is lost (what was committed before the fault
is still whole, and a retry finishes the job without fetching again what was already held),
nothing corrupt or half-visible is committed, and the error a client sees names the problem.
``harness.py`` holds the shared parts; ``bench/soak.py`` runs the soak test for longer.
"""
