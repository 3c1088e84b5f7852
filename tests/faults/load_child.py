"""A load generator in its own process (so its threads do not slow the measuring process).

``python -m tests.faults.load_child scrape URL THREADS`` GETs URL in a loop on THREADS
threads; ``preheat SOCKET THREADS REF COUNT`` calls Preheat with COUNT copies of REF in a loop.
Each finished call prints its outcome on a line (``OK``, or a gRPC status name); the process
runs until it is terminated.
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from collections.abc import Callable

import grpc

from cacheagent._proto.cacheagent.v1 import agent_pb2 as apb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as apb_grpc

_print_lock = threading.Lock()


def scrape(url: str) -> Callable[[], str]:
    def call() -> str:
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
            return "OK" if resp.status == 200 else str(resp.status)

    return call


def preheat(socket: str, ref: str, count: int) -> Callable[[], str]:
    def call() -> str:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            stub = apb_grpc.AgentStub(channel)
            try:
                for _ in stub.Preheat(apb.PreheatRequest(refs=[ref] * count), timeout=60):
                    pass
            except grpc.RpcError as err:
                return str(err.code().name)
        return "OK"

    return call


def main(argv: list[str]) -> None:
    kind, target, threads = argv[0], argv[1], int(argv[2])
    call = scrape(target) if kind == "scrape" else preheat(target, argv[3], int(argv[4]))

    def loop() -> None:
        while True:
            outcome = call()
            with _print_lock:
                print(outcome, flush=True)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
