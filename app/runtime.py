"""Connecting to Ray: an existing cluster when there is one, else an embedded local Ray; and how
much of Ray's own logging reaches the console (`TEMPER_VERBOSE`)."""

from __future__ import annotations

import contextlib
import os
import sys

VERBOSE_ENV = "TEMPER_VERBOSE"
"""Set to 1 (or pass the CLI's `--verbose`) to see Ray's own log lines, which are off by default."""

# Ray Train configures its own loggers in the controller and worker processes ("structured
# logging") and prints every INFO record of `ray.train` to the console, e.g. one
# `Reporting training result N: TrainingReport(...)` line per report per rank. Turned off, those
# loggers fall back to the job's logging config, whose level `connect` sets below. The driver
# reads these variables when a trainer starts and hands them to the controller and the workers
# (`ray/train/v2/_internal/constants.py`, ENV_VARS_TO_PROPAGATE).
_QUIET_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
}


def verbose() -> bool:
    """Whether Ray's own log lines are wanted on the console (`TEMPER_VERBOSE=1`)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cluster_known() -> bool:
    """Whether this process is connected to Ray or told where a cluster runs (RAY_ADDRESS).

    Without either, `connect` would start an embedded Ray. Ray is not imported to find out.
    """
    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def ray_log_options() -> dict:
    """`ray.init` options for the console: quiet (warnings and errors only) unless `verbose()`.

    Our own progress lines are printed, not logged, so they show either way.
    """
    import logging

    import ray

    if verbose():
        return {}
    for name, value in _QUIET_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # a value the user set wins
    return {
        "logging_level": logging.WARNING,  # the driver's `ray` logger: no "Started a local Ray instance" line
        # every task and actor process of this job (Train's controller and workers included)
        "logging_config": ray.LoggingConfig(log_level="WARNING"),
    }


# Ray Serve reads these when each of its processes (controller, proxy, replicas) imports it; the
# processes inherit the environment of the `ray.init` that starts the local Ray, so they must be
# set before that. An ingress replica under direct ingress stays up for a draining period (30 s by
# default) before it stops, for an external load balancer to take it out of rotation; an embedded
# Ray has no balancer in front, and 30 s per ingress restart would slow every redeploy.
_DIRECT_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


# Two of Ray's background loops are set lighter on every node that `python -m app` starts (and
# every cluster the tests start); Ray reads each when the process concerned starts, and the
# processes inherit the environment of `ray.init` (or `ray start`).
# - Ray's log monitor (one Python process per node) forwards what task and actor processes print
#   to the drivers. Every 0.1 s it re-lists the logs folder while it tracks under 1,000 files, and
#   it reads every file it holds open; the files of exited workers are only moved out of its way
#   once it holds its limit of open files (200). A machine that starts many short-lived workers
#   (each training run, trial and replica is a few) ends up with hundreds of files, and the monitor
#   then costs a steady ~5% of a core (3.4 CPU-s per minute measured on 2 cores with 60 exited
#   actors' files; 0.4 with these values). Re-listing every second and holding at most 64 files
#   lets it move exited workers' files aside early; what a worker prints still reaches the driver,
#   at most a second later when the worker is new (its file is read from the start).
# - Ray Serve's controller runs its control loop (replica states, autoscaling, deploy progress)
#   every 0.1 s: 2.9 CPU-s per minute with one idle application on this 2-core machine, 1.3 every
#   0.5 s. A deploy or a replica start is then noticed up to 0.4 s later; health checks (every 10 s)
#   and request routing do not go through the loop.
_LIGHT_NODE_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1",
    "RAY_LOG_MONITOR_MAX_OPEN_FILES": "64",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def _user_first(defaults: dict[str, str]) -> dict[str, str]:
    """`defaults`, with the value of each variable the user set in the environment instead."""
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def light_node_env() -> dict[str, str]:
    """The environment of a Ray node whose log monitor and Serve controller stay light (see above);
    a value the user set wins."""
    return _user_first(_LIGHT_NODE_ENV)


def direct_ingress_env() -> dict[str, str]:
    """The environment that turns on Ray Serve's throughput-optimized mode (direct ingress) in a
    Ray started from it; a value the user set wins."""
    return _user_first(_DIRECT_INGRESS_ENV)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`values` in this process's environment inside the block, the previous values after it.

    Around `ray.init`, the processes that Ray starts (and their workers) keep them, and this
    process does not: in the driver, the throughput-optimized mode would run a deployment handle's
    router on the caller's event loop, and a handle used from synchronous code (`serve status`,
    `serve advise`, `HandleClient`) fails with "No event loop running"."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def connect(num_cpus: int | None = None, dashboard: bool = True, direct_ingress: bool = False) -> str:
    """Initialise Ray once; returns 'cluster' or 'embedded'. Its own line goes to stderr.

    - Already initialised (tests, notebooks): used as is.
    - `RAY_ADDRESS` set (inside `ray job submit`, or by the user): connect to that cluster.
    - Otherwise: start an embedded local Ray with `num_cpus` logical CPUs (default: at least 4,
      so 2 training workers, the registry and Serve fit on a 2-core laptop). `address="local"`
      always starts a new instance: with "auto" (the default), a stale current-cluster file
      left in Ray's temp folder by a stopped cluster makes `ray.init` fail. With
      `direct_ingress` (`serve.direct_ingress`), it starts with Ray Serve's throughput-optimized
      mode on; a running cluster keeps the mode it was started with.
    """
    import ray

    if ray.is_initialized():
        return "cluster" if os.environ.get("RAY_ADDRESS") else "embedded"
    options = ray_log_options()
    # Ray Train's controller polls its worker group every 2 s by default, so a run's start, each
    # report and its end are noticed up to 2 s late: seconds of every short fit and Tune trial.
    # Polled every 0.5 s they are noticed sooner, for a few more small calls per second. The
    # driver hands the setting to the controller when a trainer starts; a value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **options)
        print(f"[ray] connected to cluster at {os.environ['RAY_ADDRESS']}", file=sys.stderr, flush=True)
        return "cluster"
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # Ray Train starts a preemption watcher actor (one more process) with every worker group, to
    # notice cloud nodes being reclaimed; an embedded Ray is this one machine, which nobody
    # reclaims, and on 2 cores that process slows each fit's start by ~3 s. Ray Train reads the
    # setting from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with environment({**light_node_env(), **(direct_ingress_env() if direct_ingress else {})}):
        ctx = ray.init(
            address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
            log_to_driver=True, **options,
        )
    url = getattr(ctx, "dashboard_url", None)
    print(f"[ray] embedded local Ray with {cpus} logical CPUs" + (f"; dashboard http://{url}" if url else ""),
          file=sys.stderr, flush=True)
    return "embedded"


def connect_existing() -> bool:
    """Connect to a running Ray (RAY_ADDRESS, or a local `ray start` cluster); False when there is none."""
    import ray

    if ray.is_initialized():
        return True
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False, **ray_log_options())
    except ConnectionError:
        return False
    return True
