"""Start several SGLang servers at once.

A server's start is mostly Python imports in a few processes, one core each, so on the 2-core CI machine two or
three starts at once take little longer than one; the tests start the servers they need together where they
are independent (same checks: each server is still its own `launch_server`, with its own arguments)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager


@contextmanager
def launch_servers(*launchers):
    """Enter the `launch_server(...)` context managers `launchers` concurrently; yield their servers in order.
    Each is torn down as `launch_server` does (its log kept when the block raised). If any start fails, the
    others are stopped and the first failure is raised."""
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(launchers)) as pool:
            futures = [pool.submit(cm.__enter__) for cm in launchers]
        servers, error = [], None
        for cm, future in zip(launchers, futures):
            try:
                servers.append(future.result())
            except BaseException as e:          # noqa: BLE001 - re-raised below, after the others are stopped
                error = error or e
                continue
            stack.push(cm)                      # its __exit__ runs when the block ends (or raises)
        if error is not None:
            raise error
        yield servers


def run_concurrently(*calls):
    """Call each of the zero-argument `calls` in its own thread; their results in order (the first error raised)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]
