"""`ray job submit` of the quickstart to a two-node cluster this test did not start in-process: the
README's command, run verbatim from the repository root against a `ray start --head` and a worker
node (`ray start --address`, with a custom resource that names it) on 127.0.0.1 (their own ports
and temp folder, token authentication on), with the shrinking overrides the other e2e tests use
appended, `train.placement=SPREAD` (a training worker on each node), a free Serve port and
`--keep-serving`. The job must SUCCEED; what it made is read from outside the job: where Ray placed
the training workers (its state API), the registry database with the registry store (no Ray), the
artifact folders, the compression report, and predictions of the served model over HTTP.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port

from .conftest import ROOT, QuickstartRun, served_digits_accuracy, summary_of
from .ray_nodes import local_cluster, submit

pytestmark = pytest.mark.e2e

README_ADDRESS = "http://127.0.0.1:8265"
README_STORAGE = "/tmp/temper-cluster"
JOB_TIMEOUT_S = 600


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


def test_ray_job_submit_runs_the_quickstart_on_a_two_node_cluster(tmp_path, ray_head):
    from actors.registry.store import RegistryStore

    storage = tmp_path / "shared"
    serve_port = free_port()
    command = (readme_submit_command().replace(README_ADDRESS, "{dashboard}").replace(README_STORAGE, str(storage))
               + " " + " ".join(QuickstartRun.overrides) + f" train.placement=SPREAD serve.port={serve_port} --keep-serving --json")
    cluster = local_cluster(tmp_path)
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker(num_cpus=2, resources={"nodeB": 2})
        nodes = {n["node_id"]: n for n in cluster.state("nodes")}
        assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes.values()), nodes
        # token authentication is on: the Jobs API refuses a request without the token
        assert httpx.get(f"{cluster.dashboard_url}/api/jobs/", timeout=30).status_code == 401

        proc = submit(cluster, command.format(dashboard=cluster.dashboard_url), timeout=JOB_TIMEOUT_S)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
        assert cluster.job_info(job_id)["status"] == "SUCCEEDED"
        for marker in ("[ray] connected to cluster", "[1/4 train]", "[2/4 register]", "[3/4 compress]", "[4/4 serve]"):
            assert marker in out, marker
        summary = summary_of(proc)
        # SPREAD put one training worker on each node (Ray's state API keeps the finished actors)
        workers = cluster.state("actors", "class_name=RayTrainWorker")
        assert sorted(a["node_id"] for a in workers) == sorted(nodes), workers

        # The registry, read from its database file without Ray: the trained version and its three variants.
        store = RegistryStore(f"sqlite:///{storage / 'registry.db'}")
        try:
            versions = store.list_versions("quickstart-digits")
            served = store.get_version("quickstart-digits", "production")
        finally:
            store.close()
        assert [v["version"] for v in versions] == [1, 2, 3, 4]
        assert [v["version"] for v in summary["versions"]] == [1, 2, 3, 4]
        assert versions[0]["format"] == "torch_fp32" and versions[0]["parent"] is None
        assert sorted(v["format"] for v in versions[1:]) == ["onnx_fp32", "onnx_int8", "torch_int8"]
        assert all(v["parent"] == {"model": "quickstart-digits", "version": 1} for v in versions[1:])
        assert versions[0]["metrics"]["val_accuracy"] > 0.6
        for v in versions:  # artifacts in the shared storage, not in the job's temporary working folder
            folder = Path(v["artifact_uri"])
            assert folder.is_relative_to(storage) and folder.is_dir() and any(folder.iterdir()), v["artifact_uri"]
        assert (storage / "quickstart-digits" / "reports" / "compress-v1.md").is_file()
        assert any((storage / "train" / "quickstart-digits").glob("checkpoint_*"))

        # The app outlives the job (--keep-serving): predictions from outside, over HTTP.
        assert served["version"] == summary["served_version"]
        accuracy, answered = served_digits_accuracy(f"http://127.0.0.1:{serve_port}", "quickstart-digits", served)
        assert answered == {served["version"]}
        assert abs(accuracy - served["metrics"]["val_accuracy"]) <= 0.02, (accuracy, served["metrics"]["val_accuracy"])

        # `status` against this two-node cluster while another runs on the machine (`ray_head`, this
        # folder's cluster): both nodes, the finished job not listed as running, the registry's versions.
        status = subprocess.run([sys.executable, "-m", "app", "status", "--json", f"registry.db_url=sqlite:///{storage / 'registry.db'}"],
                                env={**cluster.client_env(), "RAY_ADDRESS": cluster.address}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr[-3000:]
        st = json.loads(status.stdout)
        assert st["jobs"] == {"running": []} and st["trials"] == {"running": 0}, st
        assert len(st["cluster"]["nodes"]) == 2 and st["cluster"]["cpus"]["total"] == 4, st["cluster"]
        assert [(m["name"], m["versions"]) for m in st["registry"]["models"]] == [("quickstart-digits", 4)]
    finally:
        cluster.stop()
