"""`status`: one screen of what runs: the Ray cluster (nodes, CPUs and GPUs free), jobs and Tune
trials running, the registry (models, latest versions, aliases) and the Serve applications with
their routes. `--json` prints the same as one JSON object.

Nothing is started: without a running cluster (RAY_ADDRESS, or a local `ray start`) the cluster,
job, trial and Serve parts say so, and the registry is read from its database directly. Each part
that cannot be read says why in its own `error` field instead of failing the whole command.
"""

from __future__ import annotations

import json
import os
from typing import Any

from app.cli.console import error_message
from app.cli.tables import format_table

# Ray Tune runs a function trainable in an actor of this class; an alive one is a running trial.
TUNE_TRIAL_ACTOR_CLASS = "ImplicitFunc"


def _cluster() -> dict[str, Any]:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    return {
        "address": ray.get_runtime_context().gcs_address,
        "nodes": [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
                   "cpus": n.get("Resources", {}).get("CPU", 0), "gpus": n.get("Resources", {}).get("GPU", 0),
                   "labels": {k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")}}
                  for n in nodes],
        "cpus": {"total": total.get("CPU", 0), "free": free.get("CPU", 0)},
        "gpus": {"total": total.get("GPU", 0), "free": free.get("GPU", 0)},
    }


def _jobs_and_trials() -> tuple[dict, dict]:
    """Running or pending submitted jobs, and alive Tune trial actors, from Ray's state API (the dashboard)."""
    import ray
    from ray.util.state import list_actors, list_jobs

    # The connected cluster's own address: without one the state API looks for "the" cluster on
    # this machine and refuses to choose when there are several (Ray's "Found multiple active Ray
    # instances"), although this process knows which one it is connected to.
    address = ray.get_runtime_context().gcs_address
    try:
        jobs = [{"job_id": j.submission_id or j.job_id, "status": str(j.status), "entrypoint": j.entrypoint}
                for j in list_jobs(address=address, raise_on_missing_output=False)
                if str(j.status).split(".")[-1] in ("PENDING", "RUNNING") and j.type != "DRIVER"]
        job_part: dict = {"running": jobs}
    except Exception as err:  # noqa: BLE001 (the dashboard may be off or unreachable)
        job_part = {"error": f"Ray's state API (dashboard) is not reachable: {error_message(err)}"}
    try:
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE"), ("class_name", "=", TUNE_TRIAL_ACTOR_CLASS)],
                             raise_on_missing_output=False)
        trial_part: dict = {"running": len(actors)}
    except Exception as err:  # noqa: BLE001
        trial_part = {"error": f"Ray's state API (dashboard) is not reachable: {error_message(err)}"}
    return job_part, trial_part


def _serve() -> dict[str, Any]:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as err:  # noqa: BLE001 (Serve not started on this cluster)
        return {"applications": [], "note": f"Serve is not running ({error_message(err)})"}
    out = []
    for name, app in apps.items():
        deployments = {d: str(getattr(s.status, "value", s.status)) for d, s in app.deployments.items()}
        out.append({"name": name, "status": str(getattr(app.status, "value", app.status)),
                    "route_prefix": getattr(app, "route_prefix", None), "deployments": deployments})
    return {"applications": out}


def _registry(cfg) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    from actors.registry.client import database_url, open_store
    from app.config.registry import mask_url_password

    url = database_url(cfg)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not os.path.exists(parsed.database):
        return {"database": mask_url_password(url), "models": [], "note": "no registry database yet"}
    store = open_store(cfg)
    try:
        models = [{"name": m["name"], "versions": m["versions"], "latest": m["latest"], "aliases": m["aliases"]}
                  for m in store.list_models()]
    finally:
        store.close()
    return {"database": mask_url_password(url), "models": models}


def collect_status(registry_cfg) -> dict[str, Any]:
    """Everything `status` shows, as a dict (what `--json` prints)."""
    from app.runtime import connect_existing

    out: dict[str, Any] = {}
    try:
        connected = connect_existing()
    except Exception as err:  # noqa: BLE001 (a stale cluster address, a refused token, ...)
        connected, out["cluster"] = False, {"error": f"cannot connect to Ray: {error_message(err)}"}
    if connected:
        out["cluster"] = _cluster()
        out["jobs"], out["trials"] = _jobs_and_trials()
        out["serve"] = _serve()
    else:
        out.setdefault("cluster", {"note": "no Ray cluster running (set RAY_ADDRESS, or start one with `ray start --head`)"})
    try:
        out["registry"] = _registry(registry_cfg)
    except Exception as err:  # noqa: BLE001
        out["registry"] = {"error": error_message(err)}
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = []
    c = st["cluster"]
    if "nodes" in c:
        lines.append(f"cluster {c['address']}: {len(c['nodes'])} node(s), CPUs {c['cpus']['free']:g} free of "
                     f"{c['cpus']['total']:g}, GPUs {c['gpus']['free']:g} free of {c['gpus']['total']:g}")
        lines.append(format_table(["node", "ip", "cpus", "gpus", "labels"], [
            [n["node_id"][:12], n["ip"], n["cpus"], n["gpus"], ",".join(f"{k}={v}" for k, v in n["labels"].items()) or "-"]
            for n in c["nodes"]]))
    else:
        lines.append(f"cluster: {c.get('note') or c.get('error')}")
    if "jobs" in st:
        j = st["jobs"]
        lines.append("")
        if "error" in j:
            lines.append(f"jobs: {j['error']}")
        else:
            lines.append(f"jobs running: {len(j['running'])}")
            for job in j["running"]:
                lines.append(f"  {job['job_id']} {job['status']} {job['entrypoint']}")
        t = st["trials"]
        lines.append(f"tune trials running: {t['running']}" if "running" in t else f"tune trials: {t['error']}")
    r = st["registry"]
    lines += ["", f"registry {r.get('database', '')}".rstrip() + ":"]
    if "error" in r:
        lines.append(f"  {r['error']}")
    elif not r["models"]:
        lines.append(f"  {r.get('note', 'no models')}")
    else:
        lines.append(format_table(["model", "versions", "latest", "aliases"], [
            [m["name"], m["versions"], m["latest"], ", ".join(f"{a}->{v}" for a, v in sorted(m["aliases"].items())) or "-"]
            for m in r["models"]]))
    if "serve" in st:
        s = st["serve"]
        lines += ["", "serve:" if s["applications"] else f"serve: {s.get('note', 'no applications')}"]
        if s["applications"]:
            lines.append(format_table(["application", "status", "route", "deployments"], [
                [a["name"], a["status"], a["route_prefix"] or "-", ", ".join(f"{d} {v}" for d, v in sorted(a["deployments"].items()))]
                for a in s["applications"]]))
    return "\n".join(lines)


def cmd_status(args) -> int:
    from app.cli.registry import config_sections
    from app.config.registry import RegistryConfig

    cfg = config_sections(args, {"registry": RegistryConfig})["registry"]
    st = collect_status(cfg)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st), file=args.out)
    return 0
