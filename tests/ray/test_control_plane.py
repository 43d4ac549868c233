"""The control plane over HTTP on the shared local Ray cluster: a served app with auth on (and a
registry actor that enforces roles) takes training jobs (real Ray Jobs through the cluster's
dashboard), reports their progress, stops them, and steers model versions, each route allowed or
refused as the README's role x operation table says, with the registry's audit rows to match."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from app.artifacts import save_fp32
from app.config.auth import AuthConfig
from app.config.data import DataConfig
from app.config.jobs import ServeApp, TrainJob
from app.config.model import ViTConfig
from app.config.registry import RegistryConfig
from app.config.serve import ServeConfig, ServedModel
from app.models import build_model
from serve.protocol import API_PREFIX
from conftest import free_port, readme_permissions, serving, wait_for

pytestmark = pytest.mark.ray

KEY_SECRET = "control-plane-test-key-secret-0123456789abcdef"
ROLES = ("viewer", "developer", "admin")


@pytest.fixture(scope="module")
def key_secret_env():
    """The server secret the registry actor (started by the deploy below) reads from the environment."""
    before = os.environ.get("TEMPER_KEY_SECRET")
    os.environ["TEMPER_KEY_SECRET"] = KEY_SECRET
    yield
    if before is None:
        del os.environ["TEMPER_KEY_SECRET"]
    else:
        os.environ["TEMPER_KEY_SECRET"] = before


@pytest.fixture(scope="module")
def registry_cfg(tmp_path_factory) -> RegistryConfig:
    # Artifacts and job storage only under this session's temporary folders.
    return RegistryConfig(actor_name=f"cp-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
                          db_url=f"sqlite:///{tmp_path_factory.mktemp('cp-registry') / 'r.db'}",
                          artifact_roots=[str(tmp_path_factory.getbasetemp())])


@pytest.fixture(scope="module")
def keys(registry_cfg) -> dict[str, str]:
    """{role: API key} made on the registry database before the actor starts."""
    from actors.registry.client import open_store

    store = open_store(registry_cfg, key_secret=KEY_SECRET.encode())
    try:
        return {role: store.create_key(f"cp-{role}", role)[1] for role in ROLES}
    finally:
        store.close()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    job = TrainJob(name="digits", model=ViTConfig(n_layer=1, d_model=32), data=DataConfig(name="digits"))
    torch.manual_seed(0)
    return str(save_fp32(tmp_path_factory.mktemp("cp-artifacts") / "vit", build_model(job.model), job))


@pytest.fixture(scope="module")
def app_cfg(ray_cluster, registry_cfg, keys, artifact, key_secret_env) -> ServeApp:
    """Auth on at the ingress and in the registry actor; `digits` v1..v3 registered, production -> v1."""
    from actors.registry.client import get_or_create_registry, registry_auth

    cfg = ServeApp(registry=registry_cfg, auth=AuthConfig(enabled=True), serve=ServeConfig(
        app_name=f"temper-cp-{uuid.uuid4().hex[:6]}", port=free_port(), route_prefix="/temper", request_timeout_s=20,
        models=[ServedModel(model="digits", version="production", cpus_per_replica=0.25)]))
    handle = get_or_create_registry(registry_cfg, auth=registry_auth(cfg.auth, True))
    for _ in range(3):
        ray_cluster.get(handle.register_version.remote("digits", artifact, "torch_fp32", credentials=keys["admin"]))
    ray_cluster.get(handle.set_alias.remote("digits", "production", 1, credentials=keys["admin"]))
    yield cfg
    ray_cluster.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def api(app_cfg):
    for url in serving(app_cfg):
        with httpx.Client(base_url=f"{url}{API_PREFIX}", timeout=60) as http:
            yield http


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error_code"] == code, body
    return body


WRITES = {"register_version", "set_alias", "remove_alias", "rollback_alias", "delete_version"}


def _registry(app_cfg, keys):
    """call(method, *args, **kwargs) on the registry actor, writes as admin."""
    import ray

    from actors.registry.client import get_or_create_registry

    handle = get_or_create_registry(app_cfg.registry)

    def call(method, *a, **kw):
        if method in WRITES:
            kw["credentials"] = keys["admin"]
        return ray.get(getattr(handle, method).remote(*a, **kw))
    return call


# ----------------------------------------------------------------------------- model versions

def _version_calls(admin) -> dict[str, list]:
    """operation (README table) -> [(prepare, method, path, body)]: `prepare()` puts the registry
    where the call can succeed (an alias with a previous version to roll back to, a fresh version to delete)."""

    def alias_history(alias):
        def prepare():
            admin("set_alias", "digits", alias, 2)
            admin("set_alias", "digits", alias, 3)
        return prepare

    artifact = admin("get_version", "digits", 1)["artifact_uri"]

    def fresh_version():
        return admin("register_version", "digits", artifact, "torch_fp32")["version"]

    register = {"artifact_uri": artifact, "format": "torch_fp32", "parent": {"model": "digits", "version": 1},
                "transformation": "imported", "metrics": {"val_accuracy": 0.5}, "tags": {"source": "http test"}}
    return {
        "read": [(None, "GET", "/models/digits/versions", None), (None, "GET", "/models/digits/versions/production", None),
                 (None, "GET", "/models/digits/compare?a=1&b=2", None)],
        "register": [(None, "POST", "/models/digits/versions", register)],
        "set_alias": [(None, "PUT", "/models/digits/aliases/staging", {"version": 2, "reason": "http test"}),
                      (lambda: admin("set_alias", "digits", "staging", 2), "DELETE", "/models/digits/aliases/staging", None)],
        "rollback": [(alias_history("staging"), "POST", "/models/digits/aliases/staging/rollback", {"reason": "http test"})],
        "set_alias_production": [(lambda: admin("set_alias", "digits", "production", 1), "PUT",
                                  "/models/digits/aliases/production", {"version": 2})],
        "rollback_production": [(alias_history("production"), "POST", "/models/digits/aliases/production/rollback", None)],
        "delete_version": [(fresh_version, "DELETE", "/models/digits/versions/{prepared}", None)],
    }


def test_version_routes_follow_the_permissions_table(api, app_cfg, keys):
    from actors.registry.client import open_store

    admin = _registry(app_cfg, keys)
    table = readme_permissions()
    expected_refusals = 0
    for operation, calls in _version_calls(admin).items():
        for prepare, method, path, body in calls:
            for role in ROLES:
                prepared = prepare() if prepare else None
                url = path.format(prepared=prepared)
                if role == ROLES[0]:
                    _error(api.request(method, url, json=body), 401, "401_0001")
                resp = api.request(method, url, json=body, headers={"X-API-Key": keys[role]})
                if table[operation][role]:
                    assert resp.status_code == (201 if operation == "register" else 200), (operation, role, method, url, resp.text)
                else:
                    err = _error(resp, 403, "403_0001")
                    assert role in err["error_message"], err
                    expected_refusals += 1
    # the answers are the registry's own
    versions = api.get("/models/digits/versions", headers={"X-API-Key": keys["viewer"]}).json()["versions"]
    assert [v["version"] for v in versions] == [v["version"] for v in admin("list_versions", "digits")]
    compare = api.get("/models/digits/compare?a=1&b=3", headers={"X-API-Key": keys["viewer"]}).json()
    assert compare == admin("compare", "digits", 1, 3)
    _error(api.get("/models/nope/versions/1", headers={"X-API-Key": keys["viewer"]}), 404, "404_0001")
    # a version registered over HTTP: lineage, metrics and tags as posted, by the developer's key
    posted = [v for v in admin("list_versions", "digits") if v["tags"].get("source") == "http test"]
    assert len(posted) == 2  # the developer's and the admin's
    assert all((v["parent"], v["transformation"]) == ({"model": "digits", "version": 1}, "imported") for v in posted)
    assert all(v["metrics"]["val_accuracy"] == 0.5 for v in posted)
    # ... and refused before the registry is asked when the artifact is not one this server can take
    dev = {"X-API-Key": keys["developer"]}
    artifact = admin("get_version", "digits", 1)["artifact_uri"]
    for uri, fmt, says in ((artifact + "-missing", "torch_fp32", "no model.safetensors"),
                           (artifact, "torch_int8", "no model_int8.safetensors"),
                           ("/etc", "torch_fp32", "outside registry.artifact_roots")):
        err = _error(api.post("/models/digits/versions", json={"artifact_uri": uri, "format": fmt}, headers=dev), 422, "422_0001")
        assert err["error_details"]["field"] == "artifact_uri" and says in err["error_message"], err
    assert [v for v in admin("list_versions", "digits") if v["artifact_uri"] != artifact] == []
    in_use = admin("get_version", "digits", "production")["version"]
    _error(api.delete(f"/models/digits/versions/{in_use}", headers={"X-API-Key": keys["admin"]}), 409, "409_0001")
    # the actor decided each write, so each refusal is in its audit log, by the key's name
    store = open_store(app_cfg.registry, key_secret=KEY_SECRET.encode())
    try:
        rows = store.query_audit(model="digits")
    finally:
        store.close()
    refused = [r for r in rows if r["result"] == "refused" and r["principal"] in ("cp-viewer", "cp-developer")]
    assert len(refused) == expected_refusals, refused
    allowed_http = [r for r in rows if r["result"] == "allowed" and r["principal"] != "cp-admin"]
    assert {r["principal"] for r in allowed_http} == {"cp-developer"}, allowed_http


# ----------------------------------------------------------------------------- training jobs

def _jobs_client():
    import ray
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://{ray._private.worker.global_worker.node.address_info['webui_url']}")


def _submissions(client) -> int:
    return sum(1 for j in client.list_jobs() if j.submission_id is not None)


def _train_config(app_cfg, storage: Path, name: str) -> dict:
    """configs/quickstart.yaml's train sections, shrunk: a 1-layer ViT, one worker, a step every few ms,
    so many steps that the job runs until it is stopped, a checkpoint every 25 steps."""
    import yaml

    tree = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml").read_text())
    tree = {k: v for k, v in tree.items() if k in ("name", "storage_path", "registry", "model", "data", "train")}
    tree.update(name=name, storage_path=str(storage), registry=app_cfg.registry.model_dump(mode="json"))
    tree["model"].update(d_model=32, n_layer=1)
    tree["train"].update(num_workers=1, steps=1_000_000, batch_size=16, warmup_steps=2, log_every=5, eval_every=25,
                         checkpoint_every=25)
    return tree


def test_training_job_submit_progress_stop(api, app_cfg, keys, tmp_path):
    from app.artifacts import load_fp32

    jobs = _jobs_client()
    dev = {"X-API-Key": keys["developer"]}
    config = _train_config(app_cfg, tmp_path / "runs", "cp-digits")

    # a bad config is a 400 naming the key, and nothing is submitted; so is a viewer's POST (403)
    before = _submissions(jobs)
    bad = {**config, "train": {**config["train"], "batch_size": 0}}
    err = _error(api.post("/training/jobs", json={"verb": "train", "config": bad}, headers=dev), 400, "400_0001")
    assert err["error_details"]["field"] == "config.train.batch_size", err
    assert "train.batch_size" in err["error_message"]
    err = _error(api.post("/training/jobs", json={"config": {**config, "bogus": 1}}, headers=dev), 400, "400_0001")
    assert err["error_details"]["field"] == "config.bogus", err
    err = _error(api.post("/training/jobs", json={"config": {**config, "storage_path": "runs"}}, headers=dev), 400, "400_0001")
    assert err["error_details"]["field"] == "config.storage_path", err
    # a job registers in this server's registry, and keeps its storage under registry.artifact_roots
    other = {**config["registry"], "actor_name": "someone-elses"}
    err = _error(api.post("/training/jobs", json={"config": {**config, "registry": other}}, headers=dev), 400, "400_0001")
    assert err["error_details"]["field"] == "config.registry" and "cp-test-" in err["error_message"], err
    outside = {**config, "storage_path": str(Path("/tmp") / f"outside-{uuid.uuid4().hex[:6]}")}
    err = _error(api.post("/training/jobs", json={"config": outside}, headers=dev), 400, "400_0001")
    assert err["error_details"]["field"] == "config.storage_path" and "artifact_roots" in err["error_message"], err
    _error(api.post("/training/jobs", json={"config": config}, headers={"X-API-Key": keys["viewer"]}), 403, "403_0001")
    _error(api.post("/training/jobs", json={"config": config}), 401, "401_0001")
    assert _submissions(jobs) == before

    # right after the cluster starts its dashboard agent may not take jobs yet (a minute or more on
    # a busy 2-core machine): a 503 to retry
    last: dict = {}

    def submitted():
        last["response"] = r = api.post("/training/jobs", json={"verb": "train", "config": config}, headers=dev)
        return r.status_code != 503 and r

    resp = wait_for(submitted, lambda: f"the Jobs API to take a job (last answer: {getattr(last.get('response'), 'text', '')[:300]})",
                    deadline_s=240, interval_s=3)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["name"] == "cp-digits" and job["verb"] == "train" and job["job_id"]
    assert _submissions(jobs) == before + 1
    job_id = job["job_id"]
    try:
        viewer = {"X-API-Key": keys["viewer"]}

        def progress():
            return api.get(f"/training/jobs/{job_id}/progress", headers=viewer).json()

        def failed():
            info = api.get(f"/training/jobs/{job_id}", headers=viewer).json()
            return f"job {job_id} to report steps: {info} / {jobs.get_job_logs(job_id)[-3000:]}"

        first = wait_for(lambda: (p := progress()).get("step") and p["step"] >= 10 and p, failed, deadline_s=180)
        assert first["steps"] == 1_000_000 and first["status"] == "RUNNING" and first["metric"] == "val_accuracy"
        assert first["loss"] > 0 and first["samples_per_s"] > 0
        # rising, with an evaluation and a checkpoint behind it
        later = wait_for(lambda: (p := progress())["step"] > first["step"] and p.get("metric_value") is not None
                         and p["step"] >= 60 and p, failed, deadline_s=120)
        assert 0.0 <= later["metric_value"] <= 1.0 and later["eval_step"] % 25 == 0

        stopped = api.post(f"/training/jobs/{job_id}/stop", headers=viewer)
        _error(stopped, 403, "403_0001")  # stopping is the `train` operation
        stopped = api.post(f"/training/jobs/{job_id}/stop", headers=dev)
        assert stopped.status_code == 200 and stopped.json()["stop_sent"] is True, stopped.text
        wait_for(lambda: api.get(f"/training/jobs/{job_id}", headers=viewer).json()["status"] == "STOPPED",
                 "the job to stop", deadline_s=60)
        at_stop = progress()
        time.sleep(1.0)  # nothing trains any more: the step stays where it stopped
        assert progress()["step"] == at_stop["step"]
    finally:
        jobs.stop_job(job_id)

    # the run keeps its last checkpoint, and it loads
    checkpoints = sorted((tmp_path / "runs" / "train" / "cp-digits").glob("checkpoint_step*"))
    assert checkpoints, list((tmp_path / "runs").rglob("*"))[:20]
    last = checkpoints[-1]
    step = int(last.name.removeprefix("checkpoint_step"))
    assert step % 25 == 0 and 25 <= step <= at_stop["step"]
    model, saved = load_fp32(last)
    assert saved.name == "cp-digits" and saved.train.steps == 1_000_000
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["scheduler"]["last_epoch"] == step

    # ids of jobs not submitted here (or of none at all) are not ours
    _error(api.get("/training/jobs/raysubmit_doesnotexist", headers=viewer), 404, "404_0001")


# ----------------------------------------------------------------------------- fuzzing

FUZZ_EXAMPLES = 24
"""Generated requests per operation, generation mode (valid / invalid input) and caller (admin
key / none), plus the admin's valid ones on the served model: at most 22 x 2 x 2 x 24 + 11 x 24 =
2,376; ~2,150 are sent (an operation without parameters has fewer distinct requests), deterministically
(`derandomize`), above the 2,000 the test asks for."""
NOT_FUZZED = {("POST", "/api/v1/training/jobs")}
"""Operations the fuzzer leaves out: a valid generated job config would start a training job."""


def test_fuzzing_from_the_openapi_schema_finds_no_server_error(api, app_cfg, keys, capsys):
    """schemathesis generates requests from the running ingress's OpenAPI schema, with an admin key
    and without: no answer is a 5xx, none takes longer than the request timeout, and a valid
    request still answers afterwards. Runs last in the module: the admin's requests may move
    aliases and delete versions. Two threads send the requests while the next ones are generated
    (generating one takes about as long as answering it), so the server also sees them overlap."""
    import threading
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    root = str(api.base_url).removesuffix("/").removesuffix(API_PREFIX)
    schema = schemathesis.openapi.from_url(f"{root}{API_PREFIX}/openapi.json")
    timeout_s = app_cfg.serve.request_timeout_s + 10
    statuses: Counter = Counter()
    failures: list[str] = []
    lock, local = threading.Lock(), threading.local()
    callers = {"admin": {"X-API-Key": keys["admin"]}, "anonymous": {}}
    operations = [r.ok() for r in schema.get_all_operations()]
    fuzzed = [op for op in operations if (op.method.upper(), op.path) not in NOT_FUZZED]
    assert {("GET", "/api/v1/models/{model}/versions"), ("POST", "/api/v1/training/jobs/{job_id}/stop"),
            ("POST", "/v1/chat/completions")} <= {(op.method.upper(), op.path) for op in fuzzed}

    def send(case, headers: dict) -> None:
        if not hasattr(local, "session"):  # a requests.Session per sending thread
            local.session = requests.Session()
        try:
            resp = case.call(base_url=root, session=local.session, headers=headers, timeout=timeout_s)
        except requests.Timeout:
            with lock:
                failures.append(f"no answer within {timeout_s} s: {case.method} {case.formatted_path} {case.body!r:.200}")
            return
        with lock:
            statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                failures.append(f"{resp.status_code} {case.method} {case.formatted_path} query={case.query} "
                                f"body={case.body!r:.300}: {resp.text[:300]}")

    runs = [(op, mode, headers, {}) for op in fuzzed
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
            for headers in callers.values()]
    # random model names mostly meet a 404: the admin's valid requests also go to the served model
    runs += [(op, schemathesis.GenerationMode.POSITIVE, callers["admin"], {"model": "digits"})
             for op in fuzzed if "{model}" in op.path]
    in_flight = threading.BoundedSemaphore(4)  # generated but not yet answered

    def sent(future) -> None:
        in_flight.release()
        if future.exception() is not None:  # e.g. a connection reset: a failure like a 5xx
            with lock:
                failures.append(f"{type(future.exception()).__name__}: {future.exception()}"[:500])

    def send_later(pool: ThreadPoolExecutor, case, headers: dict) -> None:
        in_flight.acquire()
        pool.submit(send, case, headers).add_done_callback(sent)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for op, mode, headers, path_parameters in runs:
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters or None))
            def fuzz(case) -> None:
                send_later(pool, case, headers)

            try:
                fuzz()
            except Unsatisfiable:  # e.g. no invalid input exists for an operation without parameters
                pass

    total = sum(statuses.values())
    with capsys.disabled():
        print(f"\n[fuzz] {total} requests over {len(fuzzed)} operations; status codes: "
              + ", ".join(f"{code} x{n}" for code, n in sorted(statuses.items())))
    assert not failures, "\n".join(failures[:20])
    assert total >= 2000, statuses
    # still serving: a valid request answers
    assert api.get("/health").status_code == 200
    listed = api.get("/models/digits/versions", headers=callers["admin"])
    assert listed.status_code == 200, listed.text
    predicted = api.post("/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers=callers["admin"])
    assert predicted.status_code == 200, predicted.text
