"""A two-node cluster on this machine loses its worker node during training, and the job still
succeeds, resuming from its last reported checkpoint.

The head (2 CPUs) and a worker node (2 CPUs and a custom resource `nodeB` that names it) are
separate `ray start` processes. `ray job submit` runs `python -m app train` on the quickstart
(2 DDP workers, shortened) with `train.placement=SPREAD`, so Ray puts one worker on each node, and
`train.max_failures=1`. Once Ray Train has registered a checkpoint, every process of the worker
node (its raylet, agents and the training worker there) is SIGKILLed by id, as when a machine is
lost. The job's driver, Ray Train's controller and the registry actor live on the head and survive.

How the run gets its second worker back: it fits on the head alone. SPREAD is best-effort, so the
restarted worker group (a new placement group) packs both workers onto the head's 2 CPUs once the
GCS has declared the worker node dead; nothing restarts the lost node. `train.placement=STRICT_SPREAD`
would instead wait for a second node to join.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from .ray_nodes import ROOT, local_cluster

pytestmark = pytest.mark.e2e

STEPS, EVERY = 240, 20  # a checkpoint (and an evaluation) every 20 steps, ~20 s of training on 2 cores
JOB_TIMEOUT_S = 600


def latest_checkpoint_step(run_dir) -> int | None:
    """Step of the newest checkpoint Ray Train has registered (its controller's snapshot file)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        state = json.loads(snapshot.read_text())
    except json.JSONDecodeError:  # being rewritten
        return None
    latest = state.get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else None


def test_training_job_survives_losing_the_worker_node(tmp_path):
    from actors.registry.store import RegistryStore

    storage = tmp_path / "shared"
    run_dir = storage / "train" / "quickstart-digits"
    cluster = local_cluster(tmp_path)
    try:
        cluster.start_head(num_cpus=2)
        node_b = cluster.add_worker(num_cpus=2, resources={"nodeB": 2})
        nodes = {n["node_id"]: n for n in cluster.state("nodes")}
        b_id = next(i for i, n in nodes.items() if "nodeB" in n["resources_total"])
        head_id = next(i for i, n in nodes.items() if n["is_head_node"])

        command = ["ray", "job", "submit", f"--address={cluster.dashboard_url}", "--working-dir", ".",
                   "--runtime-env", "cluster/runtime_env.yaml", "--",
                   "python", "-m", "app", "train", "configs/quickstart.yaml", f"storage_path={storage}",
                   f"registry.db_url=sqlite:///{storage}/registry.db", f"train.steps={STEPS}",
                   f"train.eval_every={EVERY}", f"train.checkpoint_every={EVERY}", "train.log_every=40",
                   "train.lr=0.004", "train.keep_last=2", "train.placement=SPREAD", "train.max_failures=1"]
        log = tmp_path / "job.log"
        with open(log, "w") as out:
            job = subprocess.Popen(command, cwd=ROOT, env=cluster.client_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (killed_after := latest_checkpoint_step(run_dir)) is None:
                assert job.poll() is None, f"the job ended before its first checkpoint:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "no checkpoint registered in time"
                time.sleep(0.1)

            killed = node_b.kill()
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        out = log.read_text()
        assert job.returncode == 0, out[-6000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
        assert cluster.job_info(job_id)["status"] == "SUCCEEDED"

        # The reported steps: attempt 1 evaluates every 20 steps until the node is lost; attempt 2
        # starts at the last registered checkpoint and goes on to the end, skipping nothing. (While
        # both nodes run, both log monitors tail the session's one log folder, so attempt 1's lines
        # come twice: the steps are compared as sets.)
        resumed = {int(s) for s in re.findall(r"\[train\] resumed from checkpoint at step (\d+)", out)}
        assert len(resumed) == 1, out[-6000:]
        (start,) = resumed
        before, after = out.split("resumed from checkpoint at step", 1)
        first = sorted({int(s) for s in re.findall(r"\[eval\] step (\d+):", before)})
        second = sorted({int(s) for s in re.findall(r"\[eval\] step (\d+):", after)})
        assert first == list(range(EVERY, first[-1] + 1, EVERY)), first
        assert 0 < killed_after <= start < STEPS and start % EVERY == 0, (killed_after, start)
        # nothing lost beyond the last checkpoint: at most the report in flight when the node died
        assert start >= first[-1] - EVERY, (start, first)
        assert second == list(range(start + EVERY, STEPS + 1, EVERY)), second

        # Placement, from Ray's state API (dead actors included), one placement group per attempt:
        # attempt 1 had a worker on each node (the one on the worker node was among the processes
        # killed), attempt 2 ran both on the head; the worker node is dead.
        assert {n["node_id"]: n["state"] for n in cluster.state("nodes")}[b_id] == "DEAD"
        groups: dict[str, list] = {}
        for actor in cluster.state("actors", "class_name=RayTrainWorker"):
            groups.setdefault(actor["placement_group_id"], []).append(actor)
        attempts = sorted(groups.values(), key=lambda g: b_id not in {a["node_id"] for a in g})
        assert [sorted(a["node_id"] for a in g) for g in attempts] == [sorted([head_id, b_id]), [head_id, head_id]], groups
        lost = next(a for a in attempts[0] if a["node_id"] == b_id)
        assert lost["pid"] in killed and lost["state"] == "DEAD", (lost, killed)

        # The trained model is registered from the final checkpoint.
        store = RegistryStore(f"sqlite:///{storage / 'registry.db'}")
        try:
            (v1,) = store.list_versions("quickstart-digits")
        finally:
            store.close()
        assert v1["format"] == "torch_fp32" and v1["artifact_uri"].endswith(f"step{STEPS:08d}")
    finally:
        cluster.stop()
