"""`ray job submit` of the quickstart to a two-node cluster this test did not start in-process, and
the loss of one of its nodes mid-training: the README's command, run verbatim from the repository
root against a `ray start --head` and a worker node (`ray start --address`, with a custom resource
`nodeB` that names it) on 127.0.0.1 (their own ports and temp folder, token authentication on), with
the shrinking overrides the other e2e tests use appended, `train.placement=SPREAD` (a training
worker on each node), `train.max_failures=1`, a free Serve port and `--keep-serving`.

Once Ray Train has registered a checkpoint, every process of the worker node (its raylet, agents
and the training worker there) is SIGKILLed by id, as when a machine is lost. The job's driver, Ray
Train's controller and the registry actor live on the head and survive. The restarted worker group
gets its second worker back by fitting on the head alone: SPREAD is best-effort, so the new
placement group packs both workers onto the head's 2 CPUs once the GCS has declared the worker node
dead; nothing restarts the lost node (`train.placement=STRICT_SPREAD` would wait for a second node).

The job must SUCCEED; what it made is read from outside the job: the steps it evaluated before and
after the loss, where Ray placed each attempt's training workers (its state API), the registry
database with the registry store (no Ray), the artifact folders, the compression report,
predictions of the served model over HTTP, and `python -m app status` of the cluster it is left with.
(One cluster and one job for both stories: each costs a cluster start and a training run on
Ray Train, about a minute apiece on 2 cores.)
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from conftest import free_port

from .conftest import ROOT, QuickstartRun, served_digits_accuracy, summary_of
from .ray_nodes import local_cluster

pytestmark = pytest.mark.e2e

README_ADDRESS = "http://127.0.0.1:8265"
README_STORAGE = "/tmp/temper-cluster"
JOB_TIMEOUT_S = 600
# A checkpoint (and an evaluation) every 20 steps, ~20 s of training on 2 cores: time to lose the
# node after the first checkpoint and before the last.
STEPS, EVERY = 240, 20


def latest_checkpoint_step(run_dir: Path) -> int | None:
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


def readme_submit_command() -> str:
    """The `ray job submit` line of the README's "On a Ray cluster" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## On a Ray cluster\n"):]
    section = section[:section.index("\n## ", 1)]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("ray job submit ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_submit_command_names_the_runtime_env_and_shared_storage():
    command = shlex.split(readme_submit_command())
    assert command[:5] == ["ray", "job", "submit", "--address", README_ADDRESS]
    assert command[command.index("--working-dir") + 1] == "."
    assert command[command.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
    entry = command[command.index("--") + 1:]
    assert entry[:5] == ["python", "-m", "app", "run", "configs/quickstart.yaml"]
    assert f"storage_path={README_STORAGE}" in entry and f"registry.db_url=sqlite:///{README_STORAGE}/registry.db" in entry


def test_ray_job_submit_runs_the_quickstart_on_two_nodes_and_survives_losing_one(tmp_path, ray_head):
    from actors.registry.store import RegistryStore

    storage = tmp_path / "shared"
    run_dir = storage / "train" / "quickstart-digits"
    serve_port = free_port()
    command = (readme_submit_command().replace(README_ADDRESS, "{dashboard}").replace(README_STORAGE, str(storage))
               + " " + " ".join(QuickstartRun.overrides)
               + f" train.steps={STEPS} train.eval_every={EVERY} train.checkpoint_every={EVERY} train.log_every=40"
               + f" train.keep_last=2 train.placement=SPREAD train.max_failures=1 serve.port={serve_port} --keep-serving --json")
    cluster = local_cluster(tmp_path)
    try:
        cluster.start_head(num_cpus=2)
        node_b = cluster.add_worker(num_cpus=2, resources={"nodeB": 2})
        nodes = {n["node_id"]: n for n in cluster.state("nodes")}
        assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes.values()), nodes
        b_id = next(i for i, n in nodes.items() if "nodeB" in n["resources_total"])
        head_id = next(i for i, n in nodes.items() if n["is_head_node"])
        # token authentication is on: the Jobs API refuses a request without the token
        assert httpx.get(f"{cluster.dashboard_url}/api/jobs/", timeout=30).status_code == 401

        log = tmp_path / "job.log"
        with open(log, "w") as sink:
            job = subprocess.Popen(["bash", "-c", command.format(dashboard=cluster.dashboard_url)], cwd=ROOT,
                                   env=cluster.client_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
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
        for marker in ("[ray] connected to cluster", "[1/4 train]", "[2/4 register]", "[3/4 compress]", "[4/4 serve]"):
            assert marker in out, marker
        summary = summary_of(SimpleNamespace(stdout=out))

        # The reported steps: attempt 1 evaluates every 20 steps until the node is lost; attempt 2
        # starts at the last registered checkpoint and goes on to the end, skipping nothing (the
        # steps are compared as sets: a line printed again would not be a lost step).
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
        # attempt 1 had a worker on each node (SPREAD; the one on the worker node was among the
        # processes killed), attempt 2 ran both on the head; the worker node is dead.
        assert {n["node_id"]: n["state"] for n in cluster.state("nodes")}[b_id] == "DEAD"
        groups: dict[str, list] = {}
        for actor in cluster.state("actors", "class_name=RayTrainWorker"):
            groups.setdefault(actor["placement_group_id"], []).append(actor)
        attempts = sorted(groups.values(), key=lambda g: b_id not in {a["node_id"] for a in g})
        assert [sorted(a["node_id"] for a in g) for g in attempts] == [sorted([head_id, b_id]), [head_id, head_id]], groups
        lost = next(a for a in attempts[0] if a["node_id"] == b_id)
        assert lost["pid"] in killed and lost["state"] == "DEAD", (lost, killed)

        # The registry, read from its database file without Ray: the version trained from the final
        # checkpoint and its three variants.
        store = RegistryStore(f"sqlite:///{storage / 'registry.db'}")
        try:
            versions = store.list_versions("quickstart-digits")
            served = store.get_version("quickstart-digits", "production")
        finally:
            store.close()
        assert [v["version"] for v in versions] == [1, 2, 3, 4]
        assert [v["version"] for v in summary["versions"]] == [1, 2, 3, 4]
        assert versions[0]["format"] == "torch_fp32" and versions[0]["parent"] is None
        assert versions[0]["artifact_uri"].endswith(f"step{STEPS:08d}")
        assert sorted(v["format"] for v in versions[1:]) == ["onnx_fp32", "onnx_int8", "torch_int8"]
        assert all(v["parent"] == {"model": "quickstart-digits", "version": 1} for v in versions[1:])
        assert versions[0]["metrics"]["val_accuracy"] > 0.6
        for v in versions:  # artifacts in the shared storage, not in the job's temporary working folder
            folder = Path(v["artifact_uri"])
            assert folder.is_relative_to(storage) and folder.is_dir() and any(folder.iterdir()), v["artifact_uri"]
        assert (storage / "quickstart-digits" / "reports" / "compress-v1.md").is_file()

        # The app outlives the job (--keep-serving): predictions from outside, over HTTP.
        assert served["version"] == summary["served_version"]
        accuracy, answered = served_digits_accuracy(f"http://127.0.0.1:{serve_port}", "quickstart-digits", served)
        assert answered == {served["version"]}
        assert abs(accuracy - served["metrics"]["val_accuracy"]) <= 0.02, (accuracy, served["metrics"]["val_accuracy"])

        # `status` against this cluster while another runs on the machine (`ray_head`, this folder's
        # cluster): the head alone (the lost node is not listed), the finished job not listed as
        # running, the registry's versions.
        status = subprocess.run([sys.executable, "-m", "app", "status", "--json", f"registry.db_url=sqlite:///{storage / 'registry.db'}"],
                                env={**cluster.client_env(), "RAY_ADDRESS": cluster.address}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr[-3000:]
        st = json.loads(status.stdout)
        assert st["jobs"] == {"running": []} and st["trials"] == {"running": 0}, st
        assert [n["node_id"] for n in st["cluster"]["nodes"]] == [head_id] and st["cluster"]["cpus"]["total"] == 2, st["cluster"]
        assert [(m["name"], m["versions"]) for m in st["registry"]["models"]] == [("quickstart-digits", 4)]
    finally:
        cluster.stop()
