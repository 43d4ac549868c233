"""Temper's command line: `python -m app VERB CONFIG [key.sub=value ...]` (also installed as `temper`).

Verbs:
  run CONFIG        train -> register -> compress -> serve -> one client call (OptimizeJob)
  train CONFIG      train with Ray Train and register the result (TrainJob)
  compress CONFIG   compress a registered version into new versions (CompressJob)
  serve CONFIG      host registered versions on Ray Serve (ServeApp)
  registry list|show  read the registry (models, versions, aliases)
  validate KIND CONFIG   check a config without running it
  schema            print the configuration reference (Markdown) generated from the pydantic models

A config error exits with status 2 and names the key; a failed job exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from app.config import JOB_KINDS, ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys (values parsed as YAML)")


def _block_while_serving(mode: str, app_name: str) -> None:
    """An embedded Ray dies with this process: stay up until Ctrl-C so the endpoint keeps answering."""
    if mode != "embedded":
        print(f"[serve] application {app_name!r} keeps running on the cluster", flush=True)
        return
    import time

    print("[serve] serving until Ctrl-C (embedded Ray stops with this process)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)


def cmd_run(args) -> int:
    from app.runtime import connect
    from pipelines.optimize import format_summary, run

    job = load_config("run", args.config, args.overrides)
    mode = connect()
    summary = run(job)
    print(format_summary(summary, job.model.kind), flush=True)
    if args.json:
        print(json.dumps(summary.__dict__, default=str))
    if args.keep_serving:
        _block_while_serving(mode, job.serve.app_name)
    else:
        from serve.app import shutdown

        shutdown(job.serve.app_name)
        print(f"[serve] application {job.serve.app_name!r} shut down (pass --keep-serving to keep it)", flush=True)
    return 0


def cmd_train(args) -> int:
    from actors.registry import get_or_create_registry
    from app.runtime import connect
    from pipelines.optimize import stage_train

    job = load_config("train", args.config, args.overrides)
    connect()
    registry = get_or_create_registry(job.registry)
    record = stage_train(job, registry)
    print(json.dumps(record, indent=2, default=str) if args.json else
          f"registered {record['model']} v{record['version']} ({record['format']}): {record['metrics']}")
    return 0


def cmd_compress(args) -> int:
    from actors.registry import get_or_create_registry
    from app.runtime import connect
    from pipelines.compress import compress

    job = load_config("compress", args.config, args.overrides)
    connect()
    source, reports = compress(job, get_or_create_registry(job.registry))
    if args.json:
        print(json.dumps({"source": source, "variants": [r.__dict__ for r in reports]}, indent=2, default=str))
    return 0


def cmd_serve(args) -> int:
    from app.runtime import connect
    from serve.app import deploy

    app_cfg = load_config("serve", args.config, args.overrides)
    mode = connect()
    url = deploy(app_cfg)
    print(f"[serve] {app_cfg.serve.app_name} at {url.rstrip('/')}/api/v1/", flush=True)
    _block_while_serving(mode, app_cfg.serve.app_name)
    return 0


def cmd_registry(args) -> int:
    import ray

    from actors.registry import get_or_create_registry
    from app.config import RegistryConfig
    from app.runtime import connect

    cfg = load_config("run", args.config, args.overrides).registry if args.config else RegistryConfig()
    connect(dashboard=False)
    reg = get_or_create_registry(cfg)
    if args.action == "list":
        rows = ray.get(reg.list_models.remote()) if not args.model else ray.get(reg.list_versions.remote(args.model))
    else:
        if not args.model:
            raise ConfigError("registry show needs --model NAME [--version REF]")
        rows = ray.get(reg.get_version.remote(args.model, args.version))
    print(json.dumps(rows, indent=2, default=str))
    return 0


def cmd_validate(args) -> int:
    cfg = load_config(args.kind, args.config, args.overrides)
    print(f"ok: {args.config} is a valid {type(cfg).__name__}")
    return 0


def cmd_schema(args) -> int:
    from app.config_docs import config_reference

    print(config_reference())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="temper", description="Temper: train, compress, register and serve models on Ray.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("run", help="train -> register -> compress -> serve -> client call")
    _add_config_args(p)
    p.add_argument("--keep-serving", action="store_true", help="leave the Serve application running at the end")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(fn=cmd_run)

    for verb, fn, text in (("train", cmd_train, "train and register"), ("compress", cmd_compress, "compress a registered version")):
        p = sub.add_parser(verb, help=text)
        _add_config_args(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)

    p = sub.add_parser("serve", help="host registered versions on Ray Serve")
    _add_config_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("registry", help="read the model registry")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("--config", help="a config whose `registry` section to use (default: the built-in defaults)")
    p.add_argument("--model", help="model name")
    p.add_argument("--version", default="latest", help="version number or alias (show)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(fn=cmd_registry)

    p = sub.add_parser("validate", help="validate a config file")
    p.add_argument("kind", choices=sorted(JOB_KINDS))
    _add_config_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("schema", help="print the configuration reference")
    p.set_defaults(fn=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
