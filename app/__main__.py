"""Temper's command line: `python -m app VERB CONFIG [key.sub=value ...]` (also installed as `temper`).

Verbs:
  run CONFIG        train -> register -> compress -> serve -> one client call (OptimizeJob)
  train CONFIG      train with Ray Train and register the result (TrainJob)
  compress CONFIG   compress a registered version into new versions (CompressJob)
  tune CONFIG       Ray Tune sweep over training; the best trial is registered (TuneJob)
  tune --resume NAME   continue an interrupted sweep by its name
  serve ACTION CONFIG   Ray Serve (ServeApp): deploy | status | shutdown | advise | config (`serve CONFIG` deploys)
  registry ACTION   the model registry: list | show | compare | alias | rollback | history | delete
  validate KIND CONFIG   check a config without running it
  schema            print the configuration reference (Markdown) generated from the pydantic models

A config error exits with status 2 and names the key; a failed job exits 1.
"""

from __future__ import annotations

import argparse
import json
import re
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


def cmd_tune(args) -> int:
    from actors.registry import get_or_create_registry
    from app.config import CompressJob
    from app.runtime import connect
    from tune.sweep import load_saved_job, run_sweep

    if args.config is None and args.resume is None:
        print("config error: give a CONFIG file, or --resume NAME to continue a sweep", file=sys.stderr)
        return 2
    if args.config is not None:
        job = load_config("tune", args.config, args.overrides)
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
                          "total_steps": result.total_steps, "report": str(result.report_path)}, default=str))
    return 0 if result.best is not None else 1


SERVE_ACTIONS = ("deploy", "status", "shutdown", "advise", "config")


def _connect_existing() -> bool:
    """Connect to a running Ray (RAY_ADDRESS, or a local `ray start` cluster); False when there is none."""
    import os

    import ray

    if ray.is_initialized():
        return True
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    except ConnectionError:
        return False
    return True


def cmd_serve(args) -> int:
    """`serve deploy|status|shutdown|advise|config CONFIG` (`serve CONFIG` = deploy)."""
    app_cfg = load_config("serve", args.config, args.overrides)
    name = app_cfg.serve.app_name
    if args.action == "config":
        import yaml

        from serve.app import serve_config_file

        text = (f"# Generated by `python -m app serve config {args.config}`; deploy with: serve deploy FILE\n"
                "# (the `deployments` entries may be edited: user_config changes are applied live)\n"
                + yaml.safe_dump(serve_config_file(app_cfg), sort_keys=False))
        if args.output:
            from pathlib import Path

            Path(args.output).write_text(text)
            print(f"[serve] wrote {args.output}: `serve deploy {args.output}` runs application {name!r}", flush=True)
        else:
            print(text, end="")
        return 0
    if args.action in ("status", "shutdown"):
        from ray import serve

        if not _connect_existing():
            print(f"serve {args.action}: no running Ray cluster found (set RAY_ADDRESS or `ray start --head`); an app "
                  "deployed with an embedded Ray lives only as long as its `serve deploy` process", file=sys.stderr)
            return 1
        if args.action == "shutdown":
            from serve.app import shutdown

            if name not in serve.status().applications:
                print(f"[serve] application {name!r} is not running", flush=True)
                return 0
            shutdown(name)
            print(f"[serve] application {name!r} shut down", flush=True)
            return 0
        from serve.app import app_status

        status = app_status(app_cfg)
        print(json.dumps(status, indent=2, default=str) if args.json else _format_serve_status(status), flush=True)
        return 0 if status["status"] != "NOT_RUNNING" else 1

    from app.runtime import connect

    was_connected = _ray_initialized()
    mode = connect()
    if args.action == "advise":
        from serve.advisor import advise

        model = args.model or app_cfg.serve.models[0].model
        advice = advise(app_cfg, model, args.slo_p99_ms, concurrency=args.concurrency, requests=args.requests,
                        duration_s=args.duration_s, max_new_tokens=args.max_new_tokens,
                        batch_sizes=tuple(args.batch_sizes), waits_ms=tuple(args.waits_ms))
        print(advice.table(), "", advice.summary(), sep="\n", flush=True)
        if args.json:
            print(json.dumps(advice.as_dict()))
        return 0 if advice.best is not None else 1
    from serve.app import deploy

    url = deploy(app_cfg)
    print(f"[serve] {name} at {url.rstrip('/')}/api/v1/", flush=True)
    if not (args.detach or was_connected):
        _block_while_serving(mode, name)
    return 0


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _format_serve_status(st: dict) -> str:
    if st["status"] == "NOT_RUNNING":
        return f"application {st['app']!r}: not running"
    lines = [f"application {st['app']!r}: {st['status']} at {st['url'].rstrip('/')}/api/v1/" + (f" ({st['message']})" if st["message"] else "")]
    rows = []
    for m in st["models"]:
        for r in m["routes"]:
            rows.append([m["model"], r["route"], r["weight"], r["deployment"], r["status"], _cell(r.get("replicas")),
                         r.get("serving_version"), r["registry_version"], r.get("backend")])
    lines += ["", _table(["model", "route", "weight", "deployment", "status", "replicas", "serving", "registry", "backend"], rows)]
    for name, d in st.get("other_deployments", {}).items():
        lines.append(f"{name}: {d['status']} {_cell(d['replicas'])}")
    for rb in st.get("rollouts", {}).get("rollbacks", []):
        lines.append(f"auto-rollback: {rb['model']} {rb['alias']} v{rb['from_version']} -> "
                     + (f"v{rb['to_version']}" if rb["to_version"] else f"refused ({rb['error']})") + f": {rb['reason']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- registry


def _registry_config(args):
    """The `registry` section of `--config FILE` (any job kind) or the defaults, with `registry.*` overrides."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from app.config import RegistryConfig, apply_overrides, format_validation_error

    tree: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config must be a mapping")
    for item in args.overrides:
        if not item.startswith("registry."):
            raise ConfigError(f"override {item!r}: registry commands only take registry.* overrides")
    apply_overrides(tree, args.overrides)
    try:
        return RegistryConfig.model_validate(tree.get("registry") or {})
    except ValidationError as err:
        lines = format_validation_error(err).splitlines()
        raise ConfigError("invalid registry config:\n" + "\n".join(f"registry.{line}" for line in lines)) from None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_cell, value)) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def _table(headers: list[str], rows: list[list]) -> str:
    """A plain text table: numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] is None for row in rows)
               and any(row[i] is not None for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _version_ref(version: dict) -> str:
    return f"{version['model']} v{version['version']}"


def _format_versions(rows: list[dict], first_metrics: list[str]) -> str:
    if not rows:
        return "(no versions)"
    keys = sorted({k for r in rows for k in r["metrics"]})
    shown = [k for k in first_metrics if k in keys] + [k for k in keys if k not in first_metrics]
    more = len(shown) - 6
    shown = shown[:6]
    headers = ["version", "label", "format", "transformation", "parent", "aliases"] + shown + ["created_at"]
    table = _table(headers, [
        [r["version"], r["label"], r["format"], r["transformation"],
         f"{r['parent']['model']} v{r['parent']['version']}" if r["parent"] else None, r["aliases"]]
        + [r["metrics"].get(k) for k in shown] + [r["created_at"][:19] + (" (deleted)" if r.get("deleted") else "")]
        for r in rows
    ])
    return table + (f"\n({more} more metrics: use --json)" if more > 0 else "")


def _format_version(r: dict, lineage: dict) -> str:
    fields = [
        ("model", r["model"]), ("version", r["version"]), ("label", r["label"]), ("format", r["format"]),
        ("transformation", r["transformation"]), ("artifact_uri", r["artifact_uri"]),
        ("parent", f"{r['parent']['model']} v{r['parent']['version']}" if r["parent"] else None),
        ("lineage", " -> ".join(f"{n['model']} v{n['version']} ({n['transformation']})" for n in lineage["path"])),
        ("children", [f"{n['model']} v{n['version']}" for n in lineage["children"]]),
        ("aliases", r["aliases"]), ("config_hash", r["config_hash"]), ("dataset_fingerprint", r["dataset_fingerprint"]),
        ("tags", r["tags"]), ("params", r["params"]), ("created_at", r["created_at"]),
        ("deleted", r["deleted"]),
    ]
    width = max(len(k) for k, _ in fields)
    out = [f"{k.ljust(width)}  {_cell(v)}" for k, v in fields]
    if r["metrics"]:
        out += ["", _table(["metric", "value"], [[k, v] for k, v in sorted(r["metrics"].items())])]
    return "\n".join(out)


def _format_compare(c: dict) -> str:
    a, b = c["a"], c["b"]
    out = [f"a: {_version_ref(a)} ({a['format']}, {a['transformation']})   b: {_version_ref(b)} ({b['format']}, {b['transformation']})", ""]
    out.append(_table(["metric", "a", "b", "delta", "relative"], [
        [m["key"], m["a"], m["b"], m["delta"], None if m["relative"] is None else f"{m['relative']:+.1%}"] for m in c["metrics"]
    ]) if c["metrics"] else "metrics: none")
    out.append("")
    if c["config"]:
        out.append(_table(["config key", "a", "b"], [[d["key"], d["a"], d["b"]] for d in c["config"]]))
    else:
        out.append("config: identical" + (" (same hash)" if c["same_config_hash"] else ""))
    if c["params"]:
        out += ["", _table(["param", "a", "b"], [[d["key"], d["a"], d["b"]] for d in c["params"]])]
    d = c["dataset"]
    out += ["", f"dataset: {'same' if d['same'] else 'different'} ({_cell(d['a'])} vs {_cell(d['b'])})"]
    lin = c["lineage"]
    path = " -- ".join(f"{n['model']} v{n['version']} ({n['transformation']})" for n in lin["path"])
    out.append(f"lineage: {lin['relation']}" + (f": {path}" if path else ""))
    return "\n".join(out)


def _format_history(rows: list[dict]) -> str:
    if not rows:
        return "(no alias changes)"
    return _table(["time", "alias", "action", "from", "to", "by", "reason"], [
        [h["created_at"], h["alias"], h["action"], h["from_version"], h["to_version"], h["actor"], h["reason"] or None]
        for h in rows
    ])


def _remote_message(err: BaseException) -> str:
    """The registry's own message (Ray wraps exceptions raised in the actor with its traceback)."""
    return str(getattr(err, "cause", None) or err).strip()


def cmd_registry(args) -> int:
    import getpass

    import ray

    from actors.registry import RegistryConflict, RegistryNotFound, get_or_create_registry
    from app.runtime import connect

    if args.action == "compare":
        args.overrides = [x for x in args.refs if "=" in x]  # version refs never contain "="
        args.refs = [x for x in args.refs if "=" not in x]
        if len(args.refs) != 2:
            raise ConfigError(f"registry compare needs two versions A B, got {args.refs}")
    cfg = _registry_config(args)
    connect(dashboard=False)
    try:
        reg = get_or_create_registry(cfg)
    except (RuntimeError, ValueError) as err:  # e.g. a database of a newer schema, another actor on that name
        print(f"registry: {err}", file=sys.stderr)
        return 1
    by = args.by if getattr(args, "by", None) else f"cli:{getpass.getuser()}"
    action = args.action

    def need(*names: str) -> None:
        missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) in (None, "")]
        if missing:
            raise ConfigError(f"registry {action} needs {' '.join(missing)}")

    try:
        if action == "list" and not args.model:
            result = ray.get(reg.list_models.remote())
            text = _table(["model", "versions", "latest", "aliases", "deleted"], [
                [m["name"], m["versions"], m["latest"], m["aliases"], m["deleted"]] for m in result
            ]) if result else "(no models)"
        elif action == "list":
            tags = dict(t.partition("=")[::2] for t in args.tag)
            result = ray.get(reg.list_versions.remote(
                args.model, where=args.where or None, order_by=args.sort, descending=args.desc, format=args.format,
                transformation=args.transformation, tags=tags or None, label=args.label, limit=args.limit,
                include_deleted=args.include_deleted,
            ))
            # the metrics named by --sort and --where get the first columns
            named = [args.sort] + [re.match(r"\s*([^\s<>=!]*)", w).group(1) for w in args.where]
            text = _format_versions(result, [m for m in named if m])
        elif action == "show":
            need("model")
            result = ray.get(reg.get_version.remote(args.model, args.version, include_deleted=args.include_deleted))
            lineage = ray.get(reg.lineage.remote(args.model, result["version"]))
            result = {**result, "lineage": lineage}
            text = _format_version(result, lineage)
        elif action == "compare":
            need("model")
            result = ray.get(reg.compare.remote(args.model, *args.refs, model_b=args.model_b))
            text = _format_compare(result)
        elif action == "alias":
            need("model", "alias")
            if args.remove:
                result = ray.get(reg.remove_alias.remote(args.model, args.alias, args.reason, by))
                text = f"{args.model}: alias {args.alias!r} removed (was v{result['from_version']})"
            else:
                need("version")
                result = ray.get(reg.set_alias.remote(args.model, args.alias, args.version, args.reason, by))
                text = (f"{args.model}: alias {args.alias!r} -> v{result['version']}"
                        + (f" (was v{result['from_version']})" if result["from_version"] else " (new)")
                        if result["changed"] else f"{args.model}: alias {args.alias!r} already points at v{result['version']}")
        elif action == "rollback":
            need("model", "alias")
            result = ray.get(reg.rollback_alias.remote(args.model, args.alias, args.reason, by))
            text = f"{args.model}: alias {args.alias!r} rolled back v{result['from_version']} -> v{result['version']}"
        elif action == "history":
            need("model")
            if args.as_of:
                need("alias")
                result = ray.get(reg.as_of.remote(args.model, args.alias, args.as_of))
                text = (f"{args.model}: alias {args.alias!r} at {result['as_of']}: "
                        + (f"v{result['version']} (since {result['since']}, {result['action']} by {result['actor']}"
                           + (f": {result['reason']}" if result["reason"] else "") + ")"
                           if result["version"] is not None else "no version"))
            else:
                result = ray.get(reg.alias_history.remote(args.model, args.alias))
                text = _format_history(result)
        elif action == "delete":
            need("model", "version")
            result = ray.get(reg.delete_version.remote(args.model, args.version, force=args.force, reason=args.reason, actor=by))
            text = f"{args.model}: deleted v{result['version']}" + (
                f" (forced; aliases removed: {', '.join(result['aliases_removed'])})" if result["forced"] else "")
        else:  # argparse only lets the choices through
            raise AssertionError(action)
    except ConfigError:  # a missing option: exits 2 like every config error
        raise
    except (RegistryNotFound, RegistryConflict, ValueError) as err:
        print(f"registry: {_remote_message(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str) if args.json else text)
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

    p = sub.add_parser("tune", help="Ray Tune sweep over training (`tune:` section); best trial registered as `tuned`")
    p.add_argument("config", nargs="?", help="YAML config file with a `tune:` section (omit with --resume NAME)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys (values parsed as YAML)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME (finished trials are not re-run)")
    p.add_argument("--storage", default="temper_runs", help="storage_path the sweep was started with (with --resume NAME; default temper_runs)")
    errored = p.add_mutually_exclusive_group()
    errored.add_argument("--resume-errored", action="store_true", help="continue errored trials from their last checkpoint")
    errored.add_argument("--restart-errored", action="store_true", help="run errored trials again from scratch")
    p.add_argument("--json", action="store_true", help="also print the best trial and version as JSON")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("serve", help="host registered versions on Ray Serve: deploy | status | shutdown | advise | config")
    serve_actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = serve_actions.add_parser("deploy", help="deploy (or update in place) the application; `serve CONFIG` does the same")
    a.add_argument("--detach", action="store_true", help="return once healthy (an embedded Ray then stops with this process)")
    a = serve_actions.add_parser("status", help="application and deployment states, version served per route, rollbacks")
    a.add_argument("--json", action="store_true")
    serve_actions.add_parser("shutdown", help="delete the application")
    a = serve_actions.add_parser("advise", help="sweep batch size x wait under load; print the best config meeting a p99 SLO")
    a.add_argument("--slo-p99-ms", type=float, required=True, help="p99 latency objective in ms (client-side, HTTP included)")
    a.add_argument("--model", help="served model to tune (default: the first of serve.models)")
    a.add_argument("--concurrency", type=int, default=32, help="closed-loop clients of the load (default 32)")
    a.add_argument("--requests", type=int, default=400, help="answers per sweep point at most (default 400)")
    a.add_argument("--duration-s", type=float, default=5.0, help="seconds per sweep point at most (default 5)")
    a.add_argument("--max-new-tokens", type=int, default=16, help="lm models: tokens per generate request (default 16)")
    a.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 8, 16, 32], metavar="1,4,8", help="max_batch_size values")
    a.add_argument("--waits-ms", type=_float_list, default=[1.0, 5.0, 10.0, 25.0], metavar="1,5,10", help="batch_wait_timeout_s values, in ms")
    a.add_argument("--json", action="store_true", help="also print the sweep as JSON")
    a = serve_actions.add_parser("config", help="write a `serve deploy` config file generated from this config")
    a.add_argument("-o", "--output", help="file to write (default: stdout)")
    for a in serve_actions.choices.values():
        _add_config_args(a)
        a.set_defaults(fn=cmd_serve)

    p = sub.add_parser("registry", help="read and change the model registry (versions, aliases, history)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="a config whose `registry` section to use (default: the built-in defaults)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def action(name: str, text: str, *, by: bool = False) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=text, parents=[common])
        a.set_defaults(fn=cmd_registry)
        if by:
            a.add_argument("--reason", default="", help="why (kept in the alias history)")
            a.add_argument("--by", help="who or what makes the change (default: cli:$USER)")
        return a

    a = action("list", "models, or the versions of --model (filter, sort)")
    a.add_argument("--model", help="list this model's versions (default: list models)")
    a.add_argument("--where", action="append", default=[], metavar="EXPR", help="metric filter, e.g. 'val_loss<2.5' (repeatable: all must hold)")
    a.add_argument("--sort", metavar="METRIC", help="sort by this metric (or version / created_at); versions without it come last")
    a.add_argument("--desc", action="store_true", help="descending order")
    a.add_argument("--format", help="only this artifact format (e.g. onnx_int8)")
    a.add_argument("--transformation", help="only versions made this way (trained, quantized, ...)")
    a.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only versions with this tag (repeatable)")
    a.add_argument("--label", help="only the version with this label")
    a.add_argument("--limit", type=int, help="at most N versions")
    a.add_argument("--include-deleted", action="store_true", help="also list deleted versions")

    a = action("show", "one version: record, metrics, lineage")
    a.add_argument("--model", help="model name")
    a.add_argument("--version", default="latest", help="version number, alias or latest (default)")
    a.add_argument("--include-deleted", action="store_true", help="show a deleted version too")

    a = action("compare", "two versions: metric deltas, differing config keys and params, lineage path")
    a.add_argument("--model", help="model of version A (and of B unless --model-b)")
    a.add_argument("--model-b", help="model of version B (default: --model)")
    # one positional list (split in cmd_registry): argparse cannot place overrides after two fixed positionals
    a.add_argument("refs", nargs="*", metavar="A B", help="the two versions: number, alias or latest (then any registry.key=value overrides)")

    a = action("alias", "point an alias at a version (or --remove it); recorded in the history", by=True)
    a.add_argument("--model", help="model name")
    a.add_argument("--alias", help="alias name, e.g. production")
    a.add_argument("--version", help="version number or another alias")
    a.add_argument("--remove", action="store_true", help="remove the alias instead")

    a = action("rollback", "move an alias back to its previous version; recorded in the history", by=True)
    a.add_argument("--model", help="model name")
    a.add_argument("--alias", help="alias name, e.g. production")

    a = action("history", "alias changes (who, when, from, to, why), or --as-of TIME for one alias")
    a.add_argument("--model", help="model name")
    a.add_argument("--alias", help="only this alias")
    a.add_argument("--as-of", metavar="TIME", help="ISO 8601 time (naive = UTC): which version --alias pointed at then")

    a = action("delete", "soft-delete a version; refused while an alias points at it unless --force", by=True)
    a.add_argument("--model", help="model name")
    a.add_argument("--version", help="version number (or alias, which needs --force)")
    a.add_argument("--force", action="store_true", help="also remove the aliases pointing at it (recorded in the history)")

    for name, a in actions.choices.items():
        if name != "compare":
            a.add_argument("overrides", nargs="*", metavar="registry.key=value", help="override registry config keys")

    p = sub.add_parser("validate", help="validate a config file")
    p.add_argument("kind", choices=sorted(JOB_KINDS))
    _add_config_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("schema", help="print the configuration reference")
    p.set_defaults(fn=cmd_schema)
    return parser


def _serve_config_option(argv: list[str]) -> list[str]:
    """`serve [ACTION] --config FILE ...` -> `serve ACTION FILE ...` (ACTION defaults to deploy)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if arg.startswith("--config="):
            path, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    else:
        return argv
    has_action = len(rest) >= 2 and rest[1] in SERVE_ACTIONS
    return rest[:2] + [path] + rest[2:] if has_action else ["serve", "deploy", path] + rest[1:]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = _serve_config_option(argv)
    if len(argv) >= 2 and argv[0] == "serve" and argv[1] not in SERVE_ACTIONS and argv[1] not in ("-h", "--help"):
        argv.insert(1, "deploy")  # `serve CONFIG` (the original form) deploys
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb == "registry" and not any(x.startswith("-") for x in extra):
        # argparse fills a variable-length positional only once: `registry compare 1 2 --json
        # registry.db_url=...` leaves the words after --json over. They belong to the same lists.
        args.overrides = getattr(args, "overrides", []) + [x for x in extra if "=" in x]
        if args.action == "compare":
            args.refs += extra
        elif any("=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(x for x in extra if '=' not in x)}")
    elif extra and args.verb == "serve" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = args.overrides + extra  # overrides after an option (`serve config C -o F key=v`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
