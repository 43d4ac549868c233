"""Connecting to Ray: an existing cluster when there is one, else an embedded local Ray."""

from __future__ import annotations

import os


def connect(num_cpus: int | None = None, dashboard: bool = True) -> str:
    """Initialise Ray once; returns 'cluster' or 'embedded'.

    - Already initialised (tests, notebooks): used as is.
    - `RAY_ADDRESS` set (inside `ray job submit`, or by the user): connect to that cluster.
    - Otherwise: start an embedded local Ray with `num_cpus` logical CPUs (default: at least 4,
      so 2 training workers, the registry and Serve fit on a 2-core laptop). `address="local"`
      keeps a stale /tmp/ray session file from being picked up (PLATFORM-NOTES).
    """
    import ray

    if ray.is_initialized():
        return "cluster" if os.environ.get("RAY_ADDRESS") else "embedded"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        print(f"[ray] connected to cluster at {os.environ['RAY_ADDRESS']}", flush=True)
        return "cluster"
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ctx = ray.init(
        address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
        log_to_driver=True,
    )
    url = getattr(ctx, "dashboard_url", None)
    print(f"[ray] embedded local Ray with {cpus} logical CPUs" + (f"; dashboard http://{url}" if url else ""), flush=True)
    return "embedded"
