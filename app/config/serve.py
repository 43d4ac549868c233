"""The `serve` section: the Ray Serve application, its served models, autoscaling and auto-rollback."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from app.config.base import MODEL_NAME_PATTERN, VERSION_REF_PATTERN, Section, VersionRef
from app.config.formats import ArtifactFormat


class AutoscalingSettings(Section):
    """Ray Serve autoscaling of a model's deployments (passed through as Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, le=1024)
    """Fewest replicas; 0 lets an idle route scale to zero (its next request waits for a replica to start)."""
    max_replicas: int = Field(2, ge=1, le=1024)
    """Most replicas."""
    initial_replicas: int | None = Field(None, ge=0, le=1024)
    """Replicas started at deploy time (default: min_replicas)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Ongoing requests per replica the autoscaler aims at. Near max_batch_size keeps batches full; far below it spreads load into small batches."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """How long the load must stay above target before replicas are added."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """How long the load must stay below target before replicas are removed."""

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= autoscaling.max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"autoscaling.initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


class AutoRollbackConfig(Section):
    """Watch a canary route against a baseline route; roll the canary's alias back in the registry when it is worse."""

    canary: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    """Traffic route (a registry alias, e.g. `staging`) whose version is judged and rolled back."""
    baseline: VersionRef
    """Traffic route the canary is compared with (e.g. `production`)."""
    window_s: float = Field(300.0, gt=0)
    """Sliding window of request outcomes compared (per route and version)."""
    check_interval_s: float = Field(60.0, gt=0)
    """How often the watcher compares (at most; it decides when outcomes arrive)."""
    min_requests: int = Field(20, ge=1)
    """Canary requests (successes + server errors) needed in the window before it is judged."""
    error_rate_factor: float = Field(1.1, ge=1.0)
    """Roll back when the canary's server-error rate exceeds the baseline's times this factor ..."""
    min_error_rate: float = Field(0.01, ge=0.0, le=1.0)
    """... and exceeds this absolute rate (so 1 error in 100 requests against a clean baseline is not enough)."""
    latency_p95_factor: float | None = Field(2.0, ge=1.0)
    """Roll back when the canary's p95 latency exceeds the baseline's times this factor (both with min_requests successes); null disables the latency check."""

    @model_validator(mode="after")
    def _distinct(self) -> "AutoRollbackConfig":
        if self.canary == self.baseline:
            raise ValueError(f"auto_rollback.canary and auto_rollback.baseline must differ (both {self.canary!r})")
        if self.canary == "latest":
            raise ValueError("auto_rollback.canary must be an alias that can be rolled back, not 'latest'")
        return self


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Adapter names: what follows `<model>:` in a `/v1` request's model field."""


ADAPTER_VERSION_PREFIX = "version:"


def registered_adapter_ref(source: str) -> str | None:
    """The version ref of an adapter source `version:<ref>` (a registered adapter); None for a folder."""
    return source[len(ADAPTER_VERSION_PREFIX):] if source.startswith(ADAPTER_VERSION_PREFIX) else None


class ServedModel(Section):
    """One registry model behind batched replicas: one deployment per traffic route."""

    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)
    """Registry model name. Required in a serve file; in a job file (`run`) it defaults to the job's `name`, the model the run trains."""
    version: VersionRef = "production"
    """Registry version number (e.g. `3`), alias (e.g. `production`) or `latest`; an alias is re-resolved every serve.alias_poll_interval_s. Leave at its default with `traffic`."""
    traffic: dict[str, int] | None = None
    """Weighted split over several versions served at once, e.g. `{production: 90, staging: 10}` (version refs -> integer percent, summing to 100). Each route is its own deployment; the first is the primary (`model-<name>`)."""
    backend: ArtifactFormat | None = None
    """Expected backend of the version; when set, serving refuses a version of another format."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Largest dynamic batch (live-reconfigurable through `user_config`); for generation, the most sequences decoding together in a replica's running batch (a request joins it at the next decode step)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    """How long a batch waits for more requests after the first (live-reconfigurable). A request that finds its replica idle skips the wait. Generation never waits: it is batched continuously."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica accepts at once; must be >= max_batch_size or batches are silently capped."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests waiting for a replica slot (per caller); beyond it requests are answered 503 with Retry-After instead of queueing forever."""
    num_replicas: int = Field(1, ge=1)
    """Replicas of each route's deployment (fixed); leave at 1 with `autoscaling`."""
    autoscaling: AutoscalingSettings | None = None
    """Autoscale each route's deployment instead of a fixed `num_replicas`."""
    cpus_per_replica: float = Field(0.5, gt=0)
    """Logical CPUs each replica reserves."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """lm models: cap on generated tokens per request."""
    stream_interval_s: float = Field(0.25, ge=0, le=10)
    """Streamed generation: a stream's first token is sent at once, then the tokens made within this long after its previous message go as one message (live-reconfigurable); 0 sends each token on its own. Every message crosses the replica, ingress and HTTP proxy: fewer of them is what lets tokens/s grow with concurrency. Lower it for smoother text where the load is light."""
    auto_rollback: AutoRollbackConfig | None = None
    """Watch `traffic`'s canary route and roll its alias back when it errs or slows down (needs `traffic`)."""
    adapters: dict[str, str] | None = None
    """hf causal LMs on a torch backend: LoRA adapters served on this model's base, name -> a peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`), e.g. `{support: /models/lora-support}`, or `version:<ref>`, a registered `lora_adapter` version of this model (a number or an alias; what `train.finetune: lora` registers), e.g. `{swap: "version:2"}`. A request picks one by name (`/v1` model `<model>:<adapter>`); it is loaded on first use."""
    max_adapters: int = Field(4, ge=1, le=256)
    """Adapters kept loaded per replica; above it the least recently used one is evicted (and loaded again when asked for)."""

    def routes(self) -> dict[str, int]:
        """Version ref -> weight (percent) of every route, primary first."""
        return dict(self.traffic) if self.traffic else {self.version: 100}

    @model_validator(mode="after")
    def _checks(self) -> "ServedModel":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.models[].max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"max_batch_size ({self.max_batch_size}); Serve would silently cap batches"
            )
        if self.traffic is not None:
            # By value, not by `model_fields_set`: configs are dumped and re-validated (workers, Serve
            # config files), which sets every field.
            if self.version != ServedModel.model_fields["version"].default:
                raise ValueError("serve.models[]: set either `version` (one route) or `traffic` (a split), not both")
            if not self.traffic:
                raise ValueError("serve.models[].traffic must name at least one version ref")
            for ref, weight in self.traffic.items():
                if not re.fullmatch(VERSION_REF_PATTERN, ref):
                    raise ValueError(f"serve.models[].traffic: {ref!r} is not a version number, alias or 'latest'")
                if weight < 0:
                    raise ValueError(f"serve.models[].traffic.{ref}: weight {weight} must be >= 0")
            if sum(self.traffic.values()) != 100:
                raise ValueError(f"serve.models[].traffic: weights sum to {sum(self.traffic.values())}; they must sum to 100 (percent)")
        if self.autoscaling is not None:
            if self.num_replicas != ServedModel.model_fields["num_replicas"].default:
                raise ValueError("serve.models[]: set either `num_replicas` (fixed) or `autoscaling`, not both")
            if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
                raise ValueError(
                    f"serve.models[].autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) "
                    f"must be <= max_ongoing_requests ({self.max_ongoing_requests}): replicas never reach it"
                )
        for name, source in (self.adapters or {}).items():
            if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
                raise ValueError(f"serve.models[].adapters: name {name!r} must match {ADAPTER_NAME_PATTERN}")
            ref = registered_adapter_ref(source)
            if ref is not None and (ref == "latest" or not re.fullmatch(VERSION_REF_PATTERN, ref)):
                raise ValueError(f"serve.models[].adapters.{name}: {source!r}: `version:` takes a version number or an alias")
        if self.auto_rollback is not None:
            routes = self.routes()
            for role in ("canary", "baseline"):
                ref = getattr(self.auto_rollback, role)
                if self.traffic is None or ref not in routes:
                    raise ValueError(
                        f"serve.models[].auto_rollback.{role} {ref!r} must be a route of serve.models[].traffic "
                        f"(routes: {sorted(routes)})"
                    )
        return self

    def max_replicas(self) -> int:
        """Upper bound of replicas per route (sizes the ingress)."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas


class ServeConfig(Section):
    """The Ray Serve application: an HTTP ingress plus batched deployments (one per model route)."""

    app_name: str = Field("temper", pattern=MODEL_NAME_PATTERN)
    """Serve application name."""
    host: str = Field("127.0.0.1", min_length=1)
    """HTTP bind address of Serve's proxy."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Serve's proxy."""
    # Ray Serve refuses a prefix with a trailing slash (other than "/" itself) at deploy time.
    route_prefix: str = Field("/", pattern=r"^/([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?$")
    """Route prefix of the ingress (`/` or `/a/b`, no trailing slash); endpoints live under `<prefix>/api/v1/`."""
    models: list[ServedModel] = Field(default_factory=list)
    """Models to host. In `run`, an empty list means: the best compressed variant of the run's model."""
    request_timeout_s: float = Field(30.0, gt=0)
    """Ingress timeout for one model call (a whole generation, streamed or not); beyond it the answer is 504."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Request bodies above this size are refused with 413."""
    max_items_per_request: int = Field(256, ge=1, le=1024)
    """Images (predict) or texts (score) one request may carry; more is refused with 413."""
    sticky_header: str = Field("x-temper-route-key", pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
    """Request header whose value pins a caller to one traffic route (hashed; same value -> same route while the weights stand)."""
    alias_poll_interval_s: float = Field(5.0, gt=0, le=3600)
    """How often each replica re-resolves its alias in the registry; a moved alias is hot-swapped without a redeploy."""
    retry_after_s: int = Field(1, ge=0, le=3600)
    """Retry-After (seconds) sent with 503 answers under overload."""
    direct_ingress: bool = False
    """Answer HTTP on the ingress replica's own port instead of through Serve's proxy (Ray Serve's throughput-optimized mode: direct ingress, gRPC between replicas, user code on the replica's main thread): about half the latency and 1.5-2x the throughput of the proxy path on 2 CPU cores. Temper turns the mode on when it starts its embedded Ray; a cluster it joins must have been started with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (otherwise a warning, and the proxy's URL is used). `deploy` prints the replica's URL, which changes when the ingress replica restarts; the proxy's URL keeps answering."""
    single_hop: bool = False
    """Run the models inside the ingress replica instead of in deployments of their own: a request takes one hop fewer (no deployment-handle call from the ingress to a model replica, which on 2 CPU cores costs about as much CPU as the model's own share of a small batched request). Batch settings, version refs, traffic weights and alias hot swaps stay live; each ingress replica loads every route of every model (one process; `cpus_per_replica` of each route is added to the ingress's CPUs). Needs the same fixed `num_replicas` on every model (it becomes the ingress's replica count; no `autoscaling`), and `HandleClient` has no model deployment to call."""
    request_log: Literal["json", "text", "off"] = "json"
    """One line per HTTP request from the ingress (logger `temper.requests`, in the ingress replica's Serve log): `json` (an object with request_id, method, path, endpoint, model, version, backend, route, adapter, status, latency_ms, batch_size), `text` (`request key=value ...` for humans) or `off`. Headers, query strings and bodies are never logged."""

    @model_validator(mode="after")
    def _unique(self) -> "ServeConfig":
        names = [m.model for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"serve.models: model {dup[0]!r} is listed twice")
        if self.single_hop:
            for i, m in enumerate(self.models):
                if m.autoscaling is not None:
                    raise ValueError(f"serve.models[{i}].autoscaling: not with serve.single_hop (the models run in the "
                                     "ingress replicas, whose count is fixed); set num_replicas or turn single_hop off")
            counts = sorted({m.num_replicas for m in self.models})
            if len(counts) > 1:
                raise ValueError(f"serve.models[].num_replicas: serve.single_hop needs one replica count for every model "
                                 f"(it is the ingress's), got {counts}")
        return self
