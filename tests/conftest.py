"""Shared fixtures. One local Ray cluster per test session (tests/ray, tests/e2e); unit tests
never start Ray."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray cluster with 4 logical CPUs, shut down after the session."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        namespace="temper-tests",
        log_to_driver=True,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
