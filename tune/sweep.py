"""Hyperparameter sweeps: Ray Tune over Temper's Ray Train pipeline.

Reads top to bottom: the search space, scheduler and searcher built from `tune:` -> the trial
(a function trainable that runs one training run and forwards each evaluation to Tune as it
happens) -> the sweep driver (new or restored by name) -> results (table, curves, the best
trial registered as a `tuned` version).

It is one idea, a sweep from its config to its registered winner, and over 500 lines because the
trial, the driver and the results table share the sweep's paths and trial records.

Ray 2.60 refuses `Tuner(TorchTrainer)` (`Improper 'run'`); a function trainable that fits a
TorchTrainer per trial is the supported pattern (Ray's "Using Ray Train with Ray Tune" guide),
and what a trial of 2+ workers does: the trial itself reserves almost nothing (`{"cpu": 0.01}`),
its training workers reserve `train.num_workers x train.cpus_per_worker`. A one-worker trial
runs the same training loop in its own process (pipelines/train.fit_in_process) and reserves
that worker's CPUs (and GPU) itself: a TorchTrainer would start a controller and a worker actor,
two more processes importing torch and Ray Train, for the same work.

Where things live (`<storage>` = the job's storage_path):
    <storage>/tune/<name>/                   Tune's experiment (stable name -> `--resume NAME`)
    <storage>/<name>/trials/trial-<id>/      one trial's training run: artifacts, done.json, attempts.jsonl,
                                             reports.jsonl (every report the trial made to Tune)
    <storage>/<name>/reports/tune-<name>.*   results table (md, csv, json) and curves (png)
    <storage>/<name>/artifacts/tuned-...     the best trial's weights, registered as `tuned`
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.registry.client import caller_credentials
from app import telemetry
from app.config.jobs import TrainJob, TuneJob, trial_tree
from app.config.tune import TuneConfig
from app.config.base import config_hash
from app.config.registry import redact_secrets
from app.evaluation import metric_kind, training_metric

JOB_FILE = "temper_tune_job.json"
"""The resolved TuneJob, saved in the experiment folder so `--resume NAME` needs no config."""

TIME_ATTR = "step"
"""Schedulers measure trial progress in optimizer steps (every evaluation reports `step`)."""


# ----------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class SweepPaths:
    experiment: Path
    trials: Path
    reports: Path

    @classmethod
    def of(cls, name: str, storage_path: str) -> "SweepPaths":
        root = Path(storage_path).resolve()
        return cls(experiment=root / "tune" / name, trials=root / name / "trials", reports=root / name / "reports")


def objective(job: TuneJob) -> tuple[str, str]:
    """(metric, mode) the sweep optimises."""
    metric, mode = training_metric(metric_kind(job.model))
    return job.tune.metric or metric, job.tune.mode or mode


# ----------------------------------------------------------------------------- search space


def search_space(tc: TuneConfig) -> dict[str, Any]:
    """Ray Tune domains keyed by dotted path (flat: Tune and Optuna keep dotted names as they are)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in tc.search_space.items():
        if dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "int":
            space[key] = tune.randint(int(dim.low), int(dim.high) + 1)  # randint's upper bound is exclusive
        elif dim.type == "choice" and tc.searcher.name != "grid":
            space[key] = tune.choice(dim.values)
        else:  # grid, or a choice under the grid searcher
            space[key] = tune.grid_search(dim.values)
    return space


def build_scheduler(job: TuneJob):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    s = job.tune.scheduler
    max_t = s.max_t or job.train.steps
    if s.name == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets)
    if s.name == "hyperband":
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=max_t, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=s.perturbation_interval, hyperparam_mutations=search_space(job.tune),
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            synch=s.synch,
        )
    return FIFOScheduler()


def build_searcher(job: TuneJob, concurrency: int):
    """The search algorithm. Ray applies `max_concurrent_trials` only to a `Searcher` (Optuna);
    a `BasicVariantGenerator` passed in ignores it (with a log warning), so it gets the limit itself."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sc = job.tune.searcher
    points = [dict(p) for p in sc.points_to_evaluate]
    if sc.name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = objective(job)
        sampler = optuna.samplers.TPESampler(seed=sc.seed, n_startup_trials=sc.n_startup_trials)
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=sc.seed, max_concurrent=concurrency)


def default_concurrency(job: TuneJob) -> int:
    """Trials at once: as many as the free CPUs fit (each trial's workers x cpus_per_worker)."""
    per_trial = job.train.num_workers * job.train.cpus_per_worker
    free = ray.available_resources().get("CPU", 0.0)
    return max(1, int(free // per_trial))


# ----------------------------------------------------------------------------- one trial


def _trial_job(job: TuneJob, values: dict, run_name: str, trials_dir: Path) -> TrainJob:
    tree = trial_tree(job, values)
    tree.update(name=run_name, storage_path=str(trials_dir))
    # Tune copies a checkpoint after Train persisted it; keep enough that rotation cannot delete
    # one a report still points at.
    tree["train"]["keep_last"] = max(3, tree["train"].get("keep_last", 2))
    return TrainJob.model_validate(tree)


def trial_resources(job: TuneJob, values: dict) -> dict[str, float]:
    """What the trial process reserves: a one-worker trial trains in it (that worker's CPUs and
    GPU); a larger one only waits on its TorchTrainer, whose workers reserve their own."""
    from pipelines.train import runs_in_process

    trial_job = TrainJob.model_validate({**trial_tree(job, values), "name": "resources"})
    if not runs_in_process(trial_job):
        return {"cpu": 0.01}
    return {"cpu": trial_job.train.cpus_per_worker, **({"gpu": 1} if trial_job.train.use_gpu else {})}


def _log_attempt(folder: Path, event: str, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **extra}) + "\n")


def _log_report(folder: Path, metrics: dict[str, float]) -> None:
    """The trial's own record of a report, written before Tune sees it (see `trial_rows`)."""
    with open(folder / "reports.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(values: dict, job_json: dict) -> None:
    """The Tune function trainable: one trial = one Ray Train run of the job with `values` set.

    - Its training run is named after the trial id, so a restored sweep resumes the run from
      its latest checkpoint (Ray Train restores by name).
    - A PBT exploit hands this trial another trial's checkpoint: it starts a new run seeded
      from that checkpoint with this trial's (mutated) hyperparameters.
    - A run that finished before (the driver died before Tune recorded it) is not trained
      again: its saved final report is handed to Tune.
    """
    from ray import tune

    from pipelines.train import runs_in_process

    job = TuneJob.model_validate(job_json)
    paths = SweepPaths.of(job.name, job.storage_path)
    trial_id = tune.get_context().get_trial_id()
    own = f"trial-{trial_id}"
    run_name, resume_from = own, None
    given = tune.get_checkpoint()
    if given is not None:
        saved = json.loads((Path(given.path) / "config.json").read_text())["job"]["name"]
        if saved.startswith(own):
            run_name = saved  # our own run (a restore): Ray Train resumes it by name
        else:  # PBT: continue from the donor's weights under a new run name
            run_name = f"{own}-x{hashlib.sha256(given.path.encode()).hexdigest()[:6]}"
            resume_from = given.path
    trial_job = _trial_job(job, values, run_name, paths.trials)
    folder = paths.trials / run_name
    done = folder / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        _log_attempt(folder, "reused", step=record["metrics"].get("step"))
        ckpt = Path(record["checkpoint"])
        tune.report(record["metrics"], checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt.is_dir() else None)
        return
    _log_attempt(folder, "start", values=values, given_checkpoint=given.path if given else None, resume_from=resume_from)

    if runs_in_process(trial_job):
        last, result = _run_in_process(trial_job, folder, resume_from)
    else:
        last, result = _run_with_trainer(trial_job, folder, run_name, resume_from)
    record = {"metrics": (last or {}).get("metrics") or result.metrics, "checkpoint": result.checkpoint_path,
              "artifact": result.artifact_path, "values": values}
    tmp = done.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, done)
    _log_attempt(folder, "finished", step=record["metrics"].get("step"))


def _run_in_process(trial_job: TrainJob, folder: Path, resume_from: str | None):
    """The one-worker run in this trial's process; each report goes straight to Tune, whose
    `report` raises when a scheduler stops the trial, which ends the run where it stands."""
    from ray import tune

    from pipelines.train import fit_in_process

    last: dict = {}

    def forward(metrics: dict, checkpoint: str | None) -> None:
        last.update(metrics=_scalars(metrics), checkpoint=checkpoint)
        _log_report(folder, last["metrics"])
        tune.report(last["metrics"], checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    try:
        result = fit_in_process(trial_job, on_report=forward, resume_from=resume_from)
    except BaseException:
        step = last.get("metrics", {}).get("step", 0)
        if step < trial_job.train.steps:
            _log_attempt(folder, "stopped", step=step)
        raise
    return last or None, result


def _run_with_trainer(trial_job: TrainJob, folder: Path, run_name: str, resume_from: str | None):
    """The run on its own Ray Train workers (a TorchTrainer in a thread of this trial); each
    report reaches this thread through a queue and is forwarded to Tune."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from pipelines.train import fit

    reports: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["result"] = fit(trial_job, report_to=reports, resume_from=resume_from)
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = err

    worker = threading.Thread(target=train, name=f"fit-{run_name}", daemon=True)
    worker.start()
    last: dict | None = None
    controller = None
    try:
        while True:
            try:
                item = reports.get(timeout=0.5)
            except Empty:
                if worker.is_alive() or not reports.empty():
                    continue
                break
            controller = item["controller"]
            metrics = _scalars(item["metrics"])
            ckpt = tune.Checkpoint.from_directory(item["checkpoint"]) if item["checkpoint"] else None
            last = {"metrics": metrics, "checkpoint": item["checkpoint"]}
            _log_report(folder, metrics)
            tune.report(metrics, checkpoint=ckpt)  # raises SystemExit when a scheduler stops or pauses the trial
    finally:
        step = (last or {}).get("metrics", {}).get("step", 0)
        # Stopped mid-run (not at its last step, which ASHA's max_t also "stops"): abort the run.
        if worker.is_alive() and controller is not None and step < trial_job.train.steps:
            _log_attempt(folder, "stopped", step=step)
            _abort_run(controller)
    worker.join()
    ray.kill(reports.actor)
    if "error" in outcome:
        raise outcome["error"]
    return last, outcome["result"]


def _abort_run(controller) -> None:
    """Abort the trial's training run before the trial process goes away.

    A run whose controller merely dies with its owner leaves its placement group (its workers'
    CPUs) reserved until Ray Train's background cleaner notices, and that cleaner finds the
    cluster through Ray's address auto-detection, which fails when the machine has seen more than
    one Ray instance: stopped trials then starve the next ones. An explicit abort frees it now."""
    try:
        ray.get(controller.abort.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # abort ends the controller's process: the call itself reports the actor gone


# ----------------------------------------------------------------------------- the sweep's metrics


class TrialTally:
    """Trials of one sweep by state, and the best objective value so far; what the sweep's
    metrics show (`temper_tune_trials`, `temper_tune_best_metric`). Plain bookkeeping: the Tune
    callback below feeds it trial events and records what it returns."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.running: set[str] = set()
        self.stopped: set[str] = set()
        self.errored: set[str] = set()
        self.best: float | None = None

    def started(self, trial_id: str) -> None:
        self.running.add(trial_id)
        self.stopped.discard(trial_id)
        self.errored.discard(trial_id)  # a resumed errored trial runs again

    def ended(self, trial_id: str, *, error: bool) -> None:
        self.running.discard(trial_id)
        (self.errored if error else self.stopped).add(trial_id)

    def counts(self) -> dict[str, int]:
        return {"running": len(self.running), "stopped": len(self.stopped), "errored": len(self.errored)}

    def offer(self, value: Any) -> bool:
        """Take a reported objective value; True when it is the new best (NaN never is)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = float(value)
            return True
        return False


def _metrics_callback(sweep: str, metric: str, mode: str):
    """A Tune callback (run in the sweep's driver) that exports the sweep's trial counts and
    best objective value through `ray.util.metrics`.

    Tune pickles the RunConfig with the experiment, so the callback holds no metric object (they
    are looked up per event, cached per process) and a restored sweep gets it back from there."""
    from ray.tune import Callback

    class SweepMetrics(Callback):
        def __init__(self) -> None:
            self.tally = TrialTally(mode)

        def _publish(self) -> None:
            for state, n in self.tally.counts().items():
                telemetry.set_gauge(telemetry.TUNE_TRIALS, n, {"sweep": sweep, "state": state})
            self._publish_best()

        def _publish_best(self) -> None:
            # Set again at every trial event, not only when it improves: a value set once, right
            # after the gauge is made, was missing from a scrape that showed the trial counts.
            best = self.tally.best
            if best is not None:
                telemetry.set_gauge(telemetry.TUNE_BEST_METRIC, best, {"sweep": sweep, "metric": metric})

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.tally.started(trial.trial_id)
            self._publish()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.tally.ended(trial.trial_id, error=False)
            self._publish()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.tally.ended(trial.trial_id, error=True)
            self._publish()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if self.tally.offer(result.get(metric)):
                self._publish_best()

    return SweepMetrics()


# ----------------------------------------------------------------------------- the sweep


@dataclass
class TrialRow:
    """One trial in the results table."""

    trial_id: str
    status: str
    values: dict[str, Any]
    steps: int
    reports: int
    metric_last: float | None
    metric_best: float | None
    stopped_early: bool
    error: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SweepResult:
    name: str
    metric: str
    mode: str
    trials: list[TrialRow]
    best: TrialRow | None
    version: dict | None
    report_path: Path | None
    total_steps: int


def _say(msg: str) -> None:
    print(msg, flush=True)


def save_job(job: TuneJob) -> Path:
    paths = SweepPaths.of(job.name, job.storage_path)
    paths.experiment.mkdir(parents=True, exist_ok=True)
    out = paths.experiment / JOB_FILE
    out.write_text(json.dumps(redact_secrets(job.model_dump(mode="json")), indent=2, sort_keys=True))
    return out


def load_saved_job(name: str, storage_path: str) -> TuneJob:
    """The TuneJob an experiment was started with (for `tune --resume NAME`)."""
    path = SweepPaths.of(name, storage_path).experiment / JOB_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no sweep named {name!r} under {Path(storage_path).resolve() / 'tune'} "
            f"({path.name} is missing); start it with `python -m app tune CONFIG`"
        )
    return TuneJob.model_validate(json.loads(path.read_text()))


def run_sweep(job: TuneJob, registry=None, *, resume: bool = False, resume_errored: bool = False,
              restart_errored: bool = False) -> SweepResult:
    """Run the sweep (restoring it when its experiment exists), write the results, register the best trial.

    Like training, re-running the same config continues the experiment: finished trials are
    never re-run, unfinished ones resume from their latest checkpoint. A *different* config under
    an existing name is refused (give it a new `name`). `resume=True` insists on an existing
    experiment. Errored trials stay errored unless `resume_errored` (continue from their last
    checkpoint) or `restart_errored` (from scratch)."""
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig as RayTuneConfig, Tuner
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    paths = SweepPaths.of(job.name, job.storage_path)
    metric, mode = objective(job)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job_json=job.model_dump(mode="json")),
                                    lambda values: resource_dict_to_pg_factory(trial_resources(job, values)))
    exists = Tuner.can_restore(str(paths.experiment))
    if resume and not exists:
        raise FileNotFoundError(f"no Tune experiment state under {paths.experiment}: nothing to resume")
    if exists:
        saved = load_saved_job(job.name, job.storage_path)
        if config_hash(saved) != config_hash(job):
            raise FileExistsError(
                f"a sweep named {job.name!r} with another config already exists under {paths.experiment}: "
                f"continue it with `python -m app tune --resume {job.name}`, or give this config a new `name`"
            )
        _say(f"[tune] resuming sweep {job.name!r} from {paths.experiment} "
             f"(errored trials: {'restart' if restart_errored else 'resume' if resume_errored else 'left as they are'})")
        tuner = Tuner.restore(str(paths.experiment), trainable=trainable, resume_unfinished=True,
                              resume_errored=resume_errored, restart_errored=restart_errored)
    else:
        save_job(job)
        concurrency = job.tune.max_concurrent_trials or default_concurrency(job)
        _say(f"[tune] sweep {job.name!r}: {job.tune.num_samples} samples of {len(job.tune.search_space)} keys, "
             f"{job.tune.searcher.name} searcher, {job.tune.scheduler.name} scheduler, {concurrency} trials at once, "
             f"optimising {metric} ({mode})")
        # reuse_actors: a trial that ended hands its process to the next trial with the same
        # resources (Tune resets the function trainable in place), so that trial skips a process
        # start and its imports of torch, Ray Train and the pipeline (~8 CPU-s on a 2-core machine;
        # test_tune.py's six sweeps ran in 212 s instead of ~280 s). A trial stopped by the
        # scheduler mid-run, whose thread does not end within Tune's 2 s, gets a fresh process.
        # Nothing of a trial outlives it in the process: each run seeds and builds its own model.
        tuner = Tuner(
            trainable,
            param_space=search_space(job.tune),
            tune_config=RayTuneConfig(
                metric=metric, mode=mode, num_samples=job.tune.num_samples, max_concurrent_trials=concurrency,
                scheduler=build_scheduler(job), search_alg=build_searcher(job, concurrency), reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=RunConfig(
                name=job.name, storage_path=str(paths.experiment.parent),
                # PBT clones a donor's checkpoint some time after it was reported: keep them all.
                checkpoint_config=CheckpointConfig(
                    num_to_keep=None if job.tune.scheduler.name == "pbt" else job.tune.keep_checkpoints),
                failure_config=FailureConfig(max_failures=job.tune.max_failures),
                callbacks=[_metrics_callback(job.name, metric, mode)],
                verbose=1,
            ),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, job, metric)
    best = pick_best(rows, mode)
    total = sum(r.steps for r in rows)
    report = write_results(job, rows, best, metric, mode)
    version = None
    if best is not None and registry is not None:
        best_result = next(r for r in grid if _trial_id(r) == best.trial_id)
        version = register_best(job, registry, best, best_result, rows, report)
    _say(f"[tune] {len(rows)} trials, {total} training steps in all; best: "
         + (f"{best.trial_id} {metric} {best.metric_last:.4f} with {best.values}" if best else "none (every trial errored)")
         + (f" -> registered {job.name} v{version['version']} (tuned)" if version else ""))
    return SweepResult(job.name, metric, mode, rows, best, version, report, total)


def _trial_dirname(trial) -> str:
    """Trial folders named by trial id only (Tune's default adds a timestamp and the values)."""
    return f"trial-{trial.trial_id}"


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def _own_reports(trials: Path, trial_id: str, metric: str) -> dict[int, float]:
    """{step: metric} from what the trial's runs recorded themselves (its own run folder and, after a
    PBT exploit, the runs it continued from a donor's checkpoint), oldest first, later wins."""
    points: dict[int, float] = {}
    files = [trials / f"trial-{trial_id}" / "reports.jsonl", *trials.glob(f"trial-{trial_id}-x*/reports.jsonl")]
    for path in sorted((f for f in files if f.is_file()), key=lambda f: f.stat().st_mtime):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            value = row.get(metric)
            if TIME_ATTR in row and value is not None and value == value:
                points[int(row[TIME_ATTR])] = float(value)
    return points


def trial_rows(grid, job: TuneJob, metric: str) -> list[TrialRow]:
    """One row per trial: searched values, steps trained, last/best metric, early-stop flag, curve."""
    _, mode = objective(job)
    trials = SweepPaths.of(job.name, job.storage_path).trials
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        points: dict[int, float] = {}
        if df is not None and metric in df and TIME_ATTR in df:
            points = {int(s): float(v) for s, v in zip(df[TIME_ATTR], df[metric]) if v == v}
        last = _scalars(result.metrics or {})
        # Tune's driver writes the results file the curve is read from after the fact, and not
        # always whole: a trial stopped at a rung right after its report can end before that row
        # is written (seen: a HyperBand trial stopped at step 1 with an empty curve), and a trial
        # paused at a rung and resumed in another trial's process (actor reuse) has been seen
        # without the rung's row. Steps missing there come from the trial's own records, and its
        # last result is known.
        for step, value in _own_reports(trials, _trial_id(result), metric).items():
            points.setdefault(step, value)
        last_step, last_value = last.get(TIME_ATTR), last.get(metric)
        if last_step is not None and last_value is not None and last_value == last_value:
            points.setdefault(int(last_step), float(last_value))
        curve = sorted(points.items())
        steps = int(last.get(TIME_ATTR, curve[-1][0] if curve else 0))
        values = {k: result.config[k] for k in job.tune.search_space if k in (result.config or {})}
        best_value = (min if mode == "min" else max)((v for _, v in curve), default=None)
        rows.append(TrialRow(
            trial_id=_trial_id(result), status="ERROR" if result.error else "TERMINATED",
            values=values, steps=steps, reports=len(curve), metric_last=last.get(metric), metric_best=best_value,
            stopped_early=result.error is None and steps < job.train.steps,
            error=str(result.error).splitlines()[0][:300] if result.error else None,
            final={k: v for k, v in last.items() if k.startswith(("val_", "train_", "sparsity")) or k in (TIME_ATTR, "lr")},
            curve=curve,
        ))
    return rows  # in the order Tune created the trials


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best last-reported metric among trials that ran to the end without error."""
    ok = [r for r in rows if r.error is None and r.metric_last is not None and not math.isnan(r.metric_last)]
    full = [r for r in ok if not r.stopped_early] or ok
    if not full:
        return None
    return (min if mode == "min" else max)(full, key=lambda r: r.metric_last)


def write_results(job: TuneJob, rows: list[TrialRow], best: TrialRow | None, metric: str, mode: str) -> Path:
    """tune-<name>.md / .csv / .json (one row per trial) and .png (metric vs step per trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = SweepPaths.of(job.name, job.storage_path).reports
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"tune-{job.name}"
    keys = list(job.tune.search_space)
    total = sum(r.steps for r in rows)

    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", *keys, "steps", "reports", f"{metric}_last", f"{metric}_best", "stopped_early", "best", "error"])
        for r in rows:
            w.writerow([r.trial_id, r.status, *[r.values.get(k) for k in keys], r.steps, r.reports, r.metric_last,
                        r.metric_best, r.stopped_early, best is not None and r.trial_id == best.trial_id, r.error or ""])
    stem.with_suffix(".json").write_text(json.dumps({
        "name": job.name, "metric": metric, "mode": mode, "total_steps": total,
        "best": best.trial_id if best else None, "trials": [r.__dict__ for r in rows],
    }, indent=2, default=str))

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# Sweep {job.name}: {metric} ({'lower' if mode == 'min' else 'higher'} is better)",
        "",
        f"{len(rows)} trials, {job.tune.searcher.name} searcher, {job.tune.scheduler.name} scheduler; "
        f"{total} training steps in all (a full grid of these trials would be {len(rows) * job.train.steps}).",
        "",
        "| trial | status | " + " | ".join(f"`{k}`" for k in keys) + f" | steps | {metric} (last) | {metric} (best) | note |",
        "|---|---|" + "---|" * len(keys) + "---|---|---|---|",
    ]
    for r in rows:
        note = "**best**" if best is not None and r.trial_id == best.trial_id else "stopped early" if r.stopped_early else (r.error or "")
        lines.append(f"| {r.trial_id} | {r.status} | " + " | ".join(fmt(r.values.get(k)) for k in keys)
                     + f" | {r.steps} | {fmt(r.metric_last)} | {fmt(r.metric_best)} | {note} |")
    lines += ["", f"![{metric} per trial]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.curve:
            xs, ys = zip(*r.curve)
            is_best = best is not None and r.trial_id == best.trial_id
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.6,
                    label=f"{r.trial_id}{' (best)' if is_best else ''}")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {job.name}: {metric} per trial")
    ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return stem.with_suffix(".md")


def register_best(job: TuneJob, registry, best: TrialRow, result, rows: list[TrialRow], report: Path) -> dict:
    """Register the best trial's last checkpoint as a `tuned` version, with the trial table attached.

    The artifact folder holds the weights, a config.json whose job is the best trial's (under the
    sweep's name), and `sweep/` with every trial's values and final metrics (md, csv, json, png)."""
    from app.artifacts import write_meta
    from pipelines.register import register_trained

    if result.checkpoint is None:
        raise RuntimeError(f"best trial {best.trial_id} left no checkpoint to register")
    tree = trial_tree(job, best.values)
    tree.update(name=job.name, storage_path=job.storage_path)
    best_job = TrainJob.model_validate(tree)
    chash = config_hash(best_job)
    artifact = Path(job.storage_path).resolve() / job.name / "artifacts" / f"tuned-{chash}-step{best.steps:08d}"
    if not artifact.exists():
        tmp = artifact.with_name(artifact.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "sweep").mkdir(parents=True)
        with result.checkpoint.as_directory() as ckpt:
            shutil.copy2(Path(ckpt) / "model.safetensors", tmp / "model.safetensors")
        write_meta(tmp, best_job, "torch_fp32", {"tune": {"experiment": job.name, "trial_id": best.trial_id, "values": best.values}})
        for ext in (".md", ".csv", ".json", ".png"):
            shutil.copy2(report.with_suffix(ext), tmp / "sweep" / f"trials{ext}")
        os.replace(tmp, artifact)
    metric, _ = objective(job)
    record, new = register_trained(
        registry, best_job, str(artifact), config_hash=chash, metrics=best.final, transformation="tuned",
        tags={"sweep": job.name, "trial": best.trial_id, "trials": str(len(rows)), "step": str(best.steps),
              "objective": metric, "trials_table": str(artifact / "sweep" / "trials.csv")},
    )
    points = [{"metrics": {metric: v}, "step": s} for s, v in best.curve]
    if new and points:
        ray.get(registry.log_metrics_batch.remote(job.name, record["version"], points, credentials=caller_credentials()))
    return record
