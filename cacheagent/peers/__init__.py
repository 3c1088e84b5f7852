"""Fleet: agents fetch blobs from each other before the origin (issue #18).

``rendezvous`` picks, per blob digest, the one node that fetches it from the origin;
``discovery`` knows the live peers (a headless Service through DNS, or a static list);
``server`` serves verified and in-flight blobs to peers over the OCI blob API subset;
``source`` wraps an origin so that blobs come from the chosen peer first; ``fleet`` wires
them together for the daemon.
"""
