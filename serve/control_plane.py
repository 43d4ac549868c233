"""The control plane over HTTP: training jobs (Ray Jobs) and model versions (the registry actor),
under `/api/v1/` on the ingress next to the model routes.

    POST   /api/v1/training/jobs                          {verb, config} -> validated, submitted as a Ray job   train / tune
    GET    /api/v1/training/jobs/{job_id}                 the Ray job's status                                 read
    GET    /api/v1/training/jobs/{job_id}/progress        the run's latest step, loss, metric, samples/s        read
    POST   /api/v1/training/jobs/{job_id}/stop            stop the Ray job (the run keeps its checkpoints)      train
    GET    /api/v1/models/{model}/versions                list versions                                         read
    POST   /api/v1/models/{model}/versions                register an artifact as the next version              register
    GET    /api/v1/models/{model}/versions/{version}      one version (number, alias or latest)                 read
    DELETE /api/v1/models/{model}/versions/{version}      soft-delete a version                                 delete_version
    GET    /api/v1/models/{model}/compare?a=..&b=..       two versions side by side                             read
    PUT    /api/v1/models/{model}/aliases/{alias}         point an alias at a version                           set_alias[_production]
    DELETE /api/v1/models/{model}/aliases/{alias}         remove an alias                                       set_alias[_production]
    POST   /api/v1/models/{model}/aliases/{alias}/rollback  the alias back to its previous version            rollback[_production]

Jobs: the posted config is validated with the job models of `app/config/` first (a bad one is a
400 naming the key, and nothing is submitted), written as JSON under the run's storage path
(`<storage_path>/<name>/jobs/<verb>-<config hash>.json`), and submitted with Ray's
`JobSubmissionClient` to the cluster's dashboard as `python -m app <verb> <file>`, run by this
replica's Python with this replica's code first on PYTHONPATH (the job runs the code that
validated its config). Only jobs submitted here (they carry `temper_*` metadata) are answered
for: other Ray jobs of the cluster are a 404, so this API cannot stop them. A job registers in this
server's registry: its `registry` section is replaced by this server's (with the database URL the
running actor opened), and one naming another actor is a 400 (else a caller could register into an
actor or database of their choosing, past its roles and roots); with `registry.artifact_roots` set
its `storage_path` must lie under one.

Versions: each route calls the registry actor's own method (the one the `registry` CLI calls)
with the request's credentials (registering checks first that the artifact is a folder this
server can see, under `registry.artifact_roots`, holding the format's weight file; the actor
checks the roots again), so the actor checks the role and writes the audit row (allowed
or refused) as it does for any caller. The ingress authenticates every caller first (401, 429);
it applies the role table to writes itself only when the actor does not (its auth off). The
actor's errors map to 401 / 403 / 404 / 409 / 422.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from fastapi import Body, Depends, FastAPI, Path as PathParam, Query, Request
from sqlalchemy.engine import make_url

from actors.registry.errors import RegistryConflict, RegistryNotFound
from actors.registry.permissions import alias_operation, check
from actors.registry.validation import check_artifact_uri
from app.artifact_roots import check_under_roots, is_uri
from app.auth.identity import AuthError, PermissionDenied
from app.config.base import MODEL_NAME_PATTERN, ConfigError, config_hash
from app.config.formats import WEIGHT_FILES
from app.config.jobs import parse_config
from app.config.registry import RegistryConfig
from app.progress import progress_path, read_progress
from serve.access import AccessControl, credentials_from
from serve.control_plane_models import (
    AliasChange, AliasRequest, DeletedVersion, ReasonRequest, RegisterRequest, StoppedJob, TrainingJob, TrainingJobRequest,
    TrainingProgress, VersionList, VersionRecord,
)
from serve.protocol import API_PREFIX, APIError

JOB_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"
"""A Ray job's submission id (`raysubmit_...`, or one chosen at submission)."""
VERB_OPERATIONS = {"train": "train", "tune": "tune", "run": "train"}
"""Job verb -> the operation of the permissions table it needs."""
METADATA_PREFIX = "temper_"

# ============================================================================ the routes


JobsClient = Callable[[], Any]
"""Returns a `ray.job_submission.JobSubmissionClient` (called in a worker thread: it does blocking HTTP)."""
RegistryHandle = Callable[[], Any]
"""Returns the registry actor's handle."""


def dashboard_address() -> str:
    """The Ray dashboard (Jobs API) of the cluster this process belongs to."""
    import ray

    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    return url if "://" in url else f"http://{url}"


def job_submission_client(address: str | None) -> JobsClient:
    """A lazily built JobSubmissionClient for `address` (default: this cluster's dashboard)."""
    made: list[Any] = []

    def get() -> Any:
        if not made:
            from ray.job_submission import JobSubmissionClient

            made.append(JobSubmissionClient(address or dashboard_address()))
        return made[0]

    return get


def code_root() -> str:
    """The folder holding this replica's `app` package: the job's PYTHONPATH, so it runs this code."""
    import app

    return str(Path(app.__file__).resolve().parent.parent)


def install_control_plane(api: FastAPI, *, access: AccessControl | None, registry: RegistryHandle | None,
                          jobs: JobsClient | None, request_timeout_s: float, retry_after_s: int,
                          registry_cfg: dict | None = None) -> None:
    """Add the control-plane routes to `api` (see the module docstring)."""

    own_registry = None if registry_cfg is None else RegistryConfig.model_validate(registry_cfg)
    roots = own_registry.artifact_roots if own_registry is not None else []

    unavailable = {"Retry-After": str(retry_after_s)}

    async def admit(request: Request, operation: str, target: str) -> None:
        if access is not None:
            request.state.principal = await access.admit(
                request.headers, request.client.host if request.client else None, operation, target)

    def needs(operation: str | Callable[[Request], str], target: Callable[[Request], str]):
        """A route dependency: runs before the body is validated, so a caller without credentials hears 401 first."""
        async def admitted(request: Request) -> None:
            await admit(request, operation if isinstance(operation, str) else operation(request), target(request))
        return [Depends(admitted)]


    def on_model(request: Request) -> str:
        return f"model {request.path_params.get('model')}"

    def on_alias(request: Request) -> str:
        return f"model {request.path_params.get('model')}@{request.path_params.get('alias')}"

    def on_job(request: Request) -> str:
        return f"training job {request.path_params.get('job_id')}"

    # ------------------------------------------------------------------ Ray Jobs

    async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if jobs is None:
            raise APIError(503, "training jobs cannot be submitted here: this ingress knows no Ray cluster")
        try:
            async with asyncio.timeout(request_timeout_s):
                return await asyncio.to_thread(lambda: fn(jobs(), *args, **kwargs))
        except asyncio.TimeoutError:
            raise APIError(504, f"the Ray Jobs API did not answer within {request_timeout_s} s (serve.request_timeout_s)") from None
        except (ConnectionError, OSError) as err:  # requests' ConnectionError is an OSError
            raise APIError(503, f"the Ray Jobs API is unreachable: {type(err).__name__}", headers=unavailable) from None
        except RuntimeError as err:  # the Jobs API answered an error, e.g. "No available agent to submit job" while the
            # cluster's dashboard agent starts: the cluster's trouble, not the request's
            raise APIError(503, f"the Ray Jobs API refused the call: {str(err)[:300]}", headers=unavailable) from None

    def described(info: Any, job_id: str) -> dict:
        meta = info.metadata or {}
        if not meta.get(f"{METADATA_PREFIX}verb"):
            raise APIError(404, f"training job {job_id!r} does not exist (no job of that id was submitted here)", "job_id")
        return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)), "message": info.message,
                "start_time": info.start_time, "end_time": info.end_time,
                "verb": meta[f"{METADATA_PREFIX}verb"], "name": meta[f"{METADATA_PREFIX}name"],
                "config_path": meta[f"{METADATA_PREFIX}config"], "storage_path": meta[f"{METADATA_PREFIX}storage"]}

    async def job_info(job_id: str) -> dict:
        def get(client: Any) -> Any:
            try:
                return client.get_job_info(job_id)
            except RuntimeError as err:  # the Jobs API's 404 ("Job ... does not exist")
                if "does not exist" in str(err) or "404" in str(err):
                    return None
                raise
        info = await in_thread(get)
        if info is None:
            raise APIError(404, f"training job {job_id!r} does not exist", "job_id")
        return described(info, job_id)

    async def job_registry(request: Request) -> dict:
        """This server's registry section for a job: its config, with the database URL the running
        actor opened (a relative SQLite path in the server's config is resolved against the
        deploying process's folder, which a job's driver does not share). A URL whose password
        the actor masks stays as configured (its password comes from `password_env` or the config)."""
        tree = own_registry.model_dump(mode="json")
        opened = (await ask(request, "settings"))["db_url"]
        if "***" not in opened:
            tree["db_url"] = opened
        return tree

    JobId = PathParam(pattern=JOB_ID_PATTERN, description="The job id POST /training/jobs answered")

    @api.post(f"{API_PREFIX}/training/jobs", name="submit_training_job", status_code=201, response_model=TrainingJob,
              responses={400: {"description": "invalid job config (the error names the key)"}},
              dependencies=needs("train", lambda request: "a training job"))
    async def submit_training_job(request: Request, body: TrainingJobRequest = Body()) -> dict:
        principal = getattr(request.state, "principal", None)
        if access is not None and access.enabled and VERB_OPERATIONS[body.verb] != "train":
            try:
                check(principal, VERB_OPERATIONS[body.verb], "a training job")
            except PermissionDenied as err:
                raise APIError(403, str(err), "authorization") from None
        config = dict(body.config)
        if own_registry is not None:
            given = config.get("registry")
            defaults = RegistryConfig.model_fields
            if isinstance(given, dict) and (given.get("actor_name", defaults["actor_name"].default),
                                            given.get("namespace", defaults["namespace"].default)) != (
                    own_registry.actor_name, own_registry.namespace):
                raise APIError(400, f"config.registry: a job submitted here registers in this server's registry (actor "
                                    f"{own_registry.actor_name!r} in namespace {own_registry.namespace!r}); leave "
                                    "`registry` out of the config, or name that actor", "config.registry")
            config["registry"] = await job_registry(request)
        try:
            job = parse_config(body.verb, config)
        except ConfigError as err:
            lines = str(err).splitlines()
            key = (lines[1] if len(lines) > 1 else lines[0]).split(":", 1)[0].strip()
            raise APIError(400, f"{err}", f"config.{key}" if key != "<root>" else "config", str(err)) from None
        # An HTTP caller has no working directory here (and a Ray worker's is not theirs): paths must be absolute.
        if not Path(job.storage_path).is_absolute():
            raise APIError(400, f"config.storage_path: {job.storage_path!r} is relative; a job submitted over HTTP needs "
                                "an absolute path (on storage the cluster's nodes share)", "config.storage_path")
        db = make_url(job.registry.db_url)
        if db.get_backend_name() == "sqlite" and not Path(db.database or "").is_absolute():
            raise APIError(400, f"config.registry.db_url: the SQLite path {db.database!r} is relative; a job submitted "
                                "over HTTP needs an absolute one (sqlite:////abs/path.db)", "config.registry.db_url")
        try:
            check_under_roots(job.storage_path, roots)
        except ValueError:  # outside every root (ArtifactOutsideRootsError), or a path the OS refuses
            raise APIError(400, f"config.storage_path: {job.storage_path!r} is outside registry.artifact_roots {roots}, "
                                "where this server's registry takes artifacts from", "config.storage_path") from None
        storage = Path(job.storage_path)
        path = storage / job.name / "jobs" / f"{body.verb}-{config_hash(job)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job.model_dump(mode="json"), indent=2, sort_keys=True))
        entrypoint = f"{shlex.quote(sys.executable)} -m app {body.verb} {shlex.quote(str(path))}"
        metadata = {f"{METADATA_PREFIX}verb": body.verb, f"{METADATA_PREFIX}name": job.name,
                    f"{METADATA_PREFIX}config": str(path), f"{METADATA_PREFIX}storage": str(storage)}
        job_id = await in_thread(lambda client: client.submit_job(
            entrypoint=entrypoint, metadata=metadata, runtime_env={"env_vars": {"PYTHONPATH": code_root()}}))
        return await job_info(job_id)

    @api.get(f"{API_PREFIX}/training/jobs/{{job_id}}", name="training_job", response_model=TrainingJob,
             dependencies=needs("read", on_job))
    async def training_job(job_id: str = JobId) -> dict:
        return await job_info(job_id)

    @api.get(f"{API_PREFIX}/training/jobs/{{job_id}}/progress", name="training_progress", response_model=TrainingProgress,
             dependencies=needs("read", on_job))
    async def training_progress(job_id: str = JobId) -> dict:
        info = await job_info(job_id)
        record = await asyncio.to_thread(read_progress, progress_path(info["storage_path"], info["name"])) or {}
        fields = set(TrainingProgress.model_fields) - {"job_id", "status", "name"}
        return {"job_id": job_id, "status": info["status"], "name": info["name"],
                **{k: v for k, v in record.items() if k in fields}}

    @api.post(f"{API_PREFIX}/training/jobs/{{job_id}}/stop", name="stop_training_job", response_model=StoppedJob,
              dependencies=needs("train", on_job))
    async def stop_training_job(job_id: str = JobId) -> dict:
        await job_info(job_id)  # a 404 for jobs not submitted here: they are not ours to stop
        sent = await in_thread(lambda client: client.stop_job(job_id))
        return {**await job_info(job_id), "stop_sent": bool(sent)}

    # ------------------------------------------------------------------ registry

    async def ask(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
        """The registry actor's `method`, with the request's credentials on writes; its refusals as API errors."""
        import ray

        if registry is None:
            raise APIError(503, "model versions cannot be read here: this ingress knows no registry")
        try:
            handle = registry()
        except ValueError as err:  # ray.get_actor: no actor of that name (yet, or any more)
            raise APIError(503, f"the registry is unavailable now: {err}", headers=unavailable) from None
        try:
            async with asyncio.timeout(request_timeout_s):
                return await getattr(handle, method).remote(*args, **kwargs)
        except asyncio.TimeoutError:
            raise APIError(504, f"the registry did not answer within {request_timeout_s} s (serve.request_timeout_s)") from None
        except ray.exceptions.RayActorError as err:
            raise APIError(503, f"the registry is unavailable now ({type(err).__name__})", headers=unavailable) from None
        except Exception as err:
            raise registry_error(err) from None

    actor_checks: dict[int, bool] = {}  # id(registry handle) -> whether that actor enforces roles

    async def write(request: Request, operation: str, target: str) -> dict:
        """Let a registry write through (the door admitted any known caller, as for `read`) and return
        the actor's keyword arguments: the request's credentials. An actor with auth on checks the
        role itself, so a refusal lands in its audit log like any other caller's; with an actor
        that does not check (auth off there), the ingress applies the table here."""
        if access is not None and access.enabled:
            handle = registry() if registry is not None else None
            if handle is not None and id(handle) not in actor_checks:
                settings = await ask(request, "settings")
                actor_checks[id(handle)] = bool(settings["auth"]["enabled"])
            if not actor_checks.get(id(handle), False):
                try:
                    check(getattr(request.state, "principal", None), operation, target)
                except PermissionDenied as err:
                    raise APIError(403, str(err), "authorization") from None
        return {"credentials": credentials_from(request.headers), "actor": "http"}

    Model = PathParam(pattern=MODEL_NAME_PATTERN, description="A registry model name")
    Alias = PathParam(pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$", description="An alias, e.g. production")
    Version = PathParam(min_length=1, max_length=64, description="A version number, an alias or `latest`")

    @api.get(f"{API_PREFIX}/models/{{model}}/versions", name="list_versions", response_model=VersionList,
             dependencies=needs("read", on_model))
    async def list_versions(request: Request, model: str = Model, limit: int | None = Query(None, ge=1, le=10_000),
                            include_deleted: bool = False) -> dict:
        found = await ask(request, "list_versions", model, limit=limit, include_deleted=include_deleted)
        return {"model": model, "versions": found}

    @api.post(f"{API_PREFIX}/models/{{model}}/versions", name="register_version", status_code=201,
              response_model=VersionRecord, dependencies=needs("read", on_model))
    async def register_version(request: Request, body: RegisterRequest, model: str = Model) -> dict:
        try:
            check_artifact_uri(body.artifact_uri)  # the registry's own check, first: no control characters, no `..`
            check_under_roots(body.artifact_uri, roots)
        except ValueError as err:  # ArtifactOutsideRootsError is one too
            raise APIError(422, str(err), "artifact_uri") from None
        if not is_uri(body.artifact_uri):  # a local folder (absolute: check_artifact_uri refused anything else)
            weights = Path(body.artifact_uri.removeprefix("file://")) / WEIGHT_FILES[body.format]
            if not weights.is_file():
                raise APIError(422, f"artifact_uri {body.artifact_uri!r}: no {weights.name} there (an absolute folder "
                                    f"on storage this server shares, holding a {body.format} artifact)", "artifact_uri")
        return await ask(request, "register_version", model, body.artifact_uri, body.format,
                         parent=body.parent.model_dump() if body.parent else None, transformation=body.transformation,
                         metrics=body.metrics or None, tags=body.tags or None, label=body.label,
                         credentials=(await write(request, "register", f"model {model}"))["credentials"])

    @api.get(f"{API_PREFIX}/models/{{model}}/versions/{{version}}", name="get_version", response_model=VersionRecord,
             dependencies=needs("read", on_model))
    async def get_version(request: Request, model: str = Model, version: str = Version) -> dict:
        return await ask(request, "get_version", model, _ref(version))

    @api.get(f"{API_PREFIX}/models/{{model}}/compare", name="compare_versions", dependencies=needs("read", on_model),
             response_model=dict[str, Any])
    async def compare_versions(request: Request, model: str = Model,
                               a: str = Query(min_length=1, max_length=64, description="first version ref"),
                               b: str = Query(min_length=1, max_length=64, description="second version ref")) -> dict:
        return await ask(request, "compare", model, _ref(a), _ref(b))

    @api.delete(f"{API_PREFIX}/models/{{model}}/versions/{{version}}", name="delete_version", response_model=DeletedVersion,
                dependencies=needs("read", on_model))
    async def delete_version(request: Request, model: str = Model, version: str = Version,
                             force: bool = Query(False, description="also remove the aliases pointing at it"),
                             reason: str = Query("", max_length=500)) -> dict:
        return await ask(request, "delete_version", model, _ref(version), force=force, reason=reason,
                         **await write(request, "delete_version", f"{model}/{version}"))

    @api.put(f"{API_PREFIX}/models/{{model}}/aliases/{{alias}}", name="set_alias", response_model=AliasChange,
             dependencies=needs("read", on_alias))
    async def set_alias(request: Request, body: AliasRequest, model: str = Model, alias: str = Alias) -> dict:
        version = _ref(body.version) if isinstance(body.version, str) else body.version
        return await ask(request, "set_alias", model, alias, version, body.reason,
                         **await write(request, alias_operation(alias), f"{model}@{alias}"))

    @api.delete(f"{API_PREFIX}/models/{{model}}/aliases/{{alias}}", name="remove_alias", response_model=AliasChange,
                dependencies=needs("read", on_alias))
    async def remove_alias(request: Request, model: str = Model, alias: str = Alias,
                           reason: str = Query("", max_length=500)) -> dict:
        return await ask(request, "remove_alias", model, alias, reason,
                         **await write(request, alias_operation(alias), f"{model}@{alias}"))

    @api.post(f"{API_PREFIX}/models/{{model}}/aliases/{{alias}}/rollback", name="rollback_alias", response_model=AliasChange,
              dependencies=needs("read", on_alias))
    async def rollback_alias(request: Request, model: str = Model, alias: str = Alias,
                             body: ReasonRequest | None = None) -> dict:
        return await ask(request, "rollback_alias", model, alias, body.reason if body else "",
                         **await write(request, alias_operation(alias, rollback=True), f"{model}@{alias}"))


def _ref(version: str) -> int | str:
    """A version ref from a path or query: digits are a number, anything else an alias (or latest)."""
    return int(version) if version.isascii() and version.isdigit() else version  # "²".isdigit() too, and int() refuses it


def registry_error(err: Exception) -> APIError:
    """The registry actor's refusal (raised through Ray, which wraps it) as the API error to answer;
    anything else is re-raised: an unexpected failure is a 500 with its trace in the log."""
    cause = getattr(err, "cause", None) or err
    message = str(cause)
    if isinstance(cause, AuthError):
        return APIError(401, f"credentials not accepted: {message}", "authorization", cause.reason)
    if isinstance(cause, PermissionDenied):
        return APIError(403, message, "authorization")
    if isinstance(cause, RegistryNotFound):
        return APIError(404, message)
    if isinstance(cause, RegistryConflict):
        return APIError(409, message)
    if isinstance(cause, (ValueError, TypeError)):
        return APIError(422, f"invalid request: {message}", detail=message)
    raise err
