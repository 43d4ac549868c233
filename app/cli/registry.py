"""`registry list|show|compare|alias|rollback|history|delete|audit`: read and change the model registry.

Reads (list, show, compare, history) open the database in this process when this process is
not connected to Ray and RAY_ADDRESS is unset, which spares the few seconds a Ray start takes
(the actor commits every write before answering, so the database is always current). With a
cluster, and for every change, they go through the registry actor: on a cluster the database
may live where only the actor reaches it, and the actor mirrors changes to MLflow. `audit` always
reads the database itself (the audit log is for whoever administers that database). Changes
send the credentials in TEMPER_API_KEY to the actor, which refuses them when its auth is on and
the key's role may not make the change.

`compare A B --eval FILE` evaluates the two versions' artifacts in this process on the eval
file's prompts (app/eval_lm.py) instead of comparing their stored metrics: per metric A, B, the
delta and a paired test's p-value over the prompts. It reads the registry like any compare.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable

from app.cli.console import error_message
from app.cli.tables import format_compare, format_eval_compare, format_history, format_table, format_version, format_versions
from app.config.base import ConfigError
from app.errors import TemperError

READ_ACTIONS = ("list", "show", "compare", "history")
"""Actions that only read: served from the database itself when no cluster runs."""

REQUIRED = {
    "show": ("model",), "compare": ("model",), "alias": ("model", "alias"), "rollback": ("model", "alias"),
    "history": ("model",), "delete": ("model", "version"),
}
"""The options each action cannot do without (`alias` also needs --version unless --remove,
`history --as-of` also needs --alias)."""


def config_sections(args, sections: dict[str, type]) -> dict:
    """{name: validated section} for `sections` of `--config FILE` (any job kind) or their defaults,
    with `NAME.key=value` overrides for those sections only."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from app.config.base import apply_overrides, format_validation_error

    tree: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config must be a mapping")
    for item in args.overrides:
        if not item.startswith(tuple(f"{name}." for name in sections)):
            allowed = " and ".join(f"{name}.*" for name in sections)
            raise ConfigError(f"override {item!r}: {args.verb} commands only take {allowed} overrides")
    apply_overrides(tree, args.overrides)
    out = {}
    for name, cls in sections.items():
        try:
            out[name] = cls.model_validate(tree.get(name) or {})
        except ValidationError as err:
            lines = format_validation_error(err).splitlines()
            raise ConfigError(f"invalid {name} config:\n" + "\n".join(f"{name}.{line}" for line in lines)) from None
    return out


def _registry_config(args):
    """The `registry` section of `--config FILE` (any job kind) or the defaults, with `registry.*` overrides."""
    from app.config.registry import RegistryConfig

    return config_sections(args, {"registry": RegistryConfig})["registry"]


def _check_options(args) -> None:
    """A missing option is a config error (exit 2), found before the registry is opened."""
    names = list(REQUIRED.get(args.action, ()))
    if args.action == "alias" and not args.remove:
        names.append("version")
    if args.action == "history" and args.as_of:
        names.append("alias")
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise ConfigError(f"registry {args.action} needs {' '.join(missing)}")


def _open_registry(cfg, read_only: bool) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(call, close): `call(method, *args, **kwargs)` runs a registry method (the store and the
    actor have the same ones). A read with no cluster running or known opens the database
    here; anything else goes through the actor, started if absent."""
    from app.runtime import cluster_known

    if read_only and not cluster_known():
        from actors.registry.client import open_store

        store = open_store(cfg)
        return (lambda method, *a, **kw: getattr(store, method)(*a, **kw)), store.close
    import ray

    from actors.registry.client import get_or_create_registry
    from app.runtime import connect

    connect(dashboard=False)
    handle = get_or_create_registry(cfg)
    return (lambda method, *a, **kw: ray.get(getattr(handle, method).remote(*a, **kw))), lambda: None


def _compare_on_eval(versions: list[dict], eval_cfg, eval_path: str) -> dict:
    """Both versions' artifacts loaded here and evaluated on the eval file's pairs (see app/eval_lm.py).
    Nothing is registered: the numbers belong to this eval file, not to either version."""
    from app.data.eval_pairs import read_eval_pairs
    from app.eval_lm import compare_results, evaluate_pairs
    from app.inference import TextPredictor, load_predictor

    pairs = read_eval_pairs(eval_cfg.data)
    predictors = [load_predictor(v["artifact_uri"]) for v in versions]  # both checked before either is evaluated
    for v, pred in zip(versions, predictors):
        if not (isinstance(pred, TextPredictor) and pred.task == "causal_lm"):
            kind = pred.task if isinstance(pred, TextPredictor) else pred.job.model.kind
            raise ValueError(f"{v['model']} v{v['version']} is a {kind} model; --eval compares causal LMs "
                             "(model.kind hf, task causal_lm)")
    results = []
    for v, pred in zip(versions, predictors):
        print(f"[eval] {v['model']} v{v['version']} ({v['format']}): {len(pairs)} prompts", file=sys.stderr, flush=True)
        results.append(evaluate_pairs(pred, pairs, eval_cfg))
    brief = [{k: v[k] for k in ("model", "version", "format", "transformation", "artifact_uri")} for v in versions]
    return {
        "a": brief[0], "b": brief[1],
        "eval": {"file": eval_path, "data": eval_cfg.data, "prompts": len(pairs), "max_new_tokens": eval_cfg.max_new_tokens,
                 "normalize": eval_cfg.normalize},
        "metrics": compare_results(*results),
        "test": "two-sided paired permutation (sign-flip) test of the mean per-prompt difference",
    }


def cmd_registry(args) -> int:
    import getpass

    from actors.registry.client import caller_credentials

    if args.action == "compare":
        args.overrides = [x for x in args.refs if "=" in x]  # version refs never contain "="
        args.refs = [x for x in args.refs if "=" not in x]
        if len(args.refs) != 2:
            raise ConfigError(f"registry compare needs two versions A B, got {args.refs}")
    cfg = _registry_config(args)
    _check_options(args)
    eval_cfg = None
    if args.action == "compare" and args.eval:
        from app.config.evaluation import load_eval_config

        eval_cfg = load_eval_config(args.eval)  # a bad eval file is a config error, found before the registry opens
    try:
        if args.action == "audit":
            from actors.registry.client import open_store

            store = open_store(cfg)
            call, close = (lambda method, *a, **kw: getattr(store, method)(*a, **kw)), store.close
        else:
            call, close = _open_registry(cfg, read_only=args.action in READ_ACTIONS)
    except (TemperError, RuntimeError, ValueError) as err:  # e.g. a database of a newer schema, another actor on that name
        print(f"registry: {error_message(err)}", file=sys.stderr)
        return 1
    by = args.by if getattr(args, "by", None) else f"cli:{getpass.getuser()}"
    action = args.action

    try:
        if action == "list" and not args.model:
            result = call("list_models")
            text = format_table(["model", "versions", "latest", "aliases", "deleted"], [
                [m["name"], m["versions"], m["latest"], m["aliases"], m["deleted"]] for m in result
            ]) if result else "(no models)"
        elif action == "list":
            tags = dict(t.partition("=")[::2] for t in args.tag)
            result = call(
                "list_versions", args.model, where=args.where or None, order_by=args.sort, descending=args.desc,
                format=args.format, transformation=args.transformation, tags=tags or None, label=args.label,
                limit=args.limit, include_deleted=args.include_deleted,
            )
            # the metrics named by --sort and --where get the first columns
            named = [args.sort] + [re.match(r"\s*([^\s<>=!]*)", w).group(1) for w in args.where]
            text = format_versions(result, [m for m in named if m])
        elif action == "show":
            result = call("get_version", args.model, args.version, include_deleted=args.include_deleted)
            lineage = call("lineage", args.model, result["version"])
            result = {**result, "lineage": lineage}
            text = format_version(result, lineage)
        elif action == "compare" and eval_cfg is not None:
            versions = [call("get_version", model, ref) for model, ref in
                        zip((args.model, args.model_b or args.model), args.refs)]
            result = _compare_on_eval(versions, eval_cfg, args.eval)
            text = format_eval_compare(result)
        elif action == "compare":
            result = call("compare", args.model, *args.refs, model_b=args.model_b)
            text = format_compare(result)
        elif action == "alias":
            if args.remove:
                result = call("remove_alias", args.model, args.alias, args.reason, by, credentials=caller_credentials())
                text = f"{args.model}: alias {args.alias!r} removed (was v{result['from_version']})"
            else:
                result = call("set_alias", args.model, args.alias, args.version, args.reason, by,
                              credentials=caller_credentials())
                text = (f"{args.model}: alias {args.alias!r} -> v{result['version']}"
                        + (f" (was v{result['from_version']})" if result["from_version"] else " (new)")
                        if result["changed"] else f"{args.model}: alias {args.alias!r} already points at v{result['version']}")
        elif action == "rollback":
            result = call("rollback_alias", args.model, args.alias, args.reason, by, credentials=caller_credentials())
            text = f"{args.model}: alias {args.alias!r} rolled back v{result['from_version']} -> v{result['version']}"
        elif action == "history":
            if args.as_of:
                result = call("as_of", args.model, args.alias, args.as_of)
                text = (f"{args.model}: alias {args.alias!r} at {result['as_of']}: "
                        + (f"v{result['version']} (since {result['since']}, {result['action']} by {result['actor']}"
                           + (f": {result['reason']}" if result["reason"] else "") + ")"
                           if result["version"] is not None else "no version"))
            else:
                result = call("alias_history", args.model, args.alias)
                text = format_history(result)
        elif action == "audit":
            result = call("query_audit", model=args.model, since=args.since, limit=args.limit)
            text = format_table(["time", "principal", "operation", "target", "result", "reason"], [
                [r["time"], r["principal"], r["operation"], r["target"], r["result"], r["reason"]] for r in result
            ]) if result else "(no audit rows)"
        elif action == "delete":
            result = call("delete_version", args.model, args.version, force=args.force, reason=args.reason, actor=by,
                          credentials=caller_credentials())
            text = f"{args.model}: deleted v{result['version']}" + (
                f" (forced; aliases removed: {', '.join(result['aliases_removed'])})" if result["forced"] else "")
        else:  # argparse only lets the choices through
            raise AssertionError(action)
    except (TemperError, ValueError) as err:  # the registry's refusals; ValueError: input it rejects
        print(f"registry: {error_message(err)}", file=sys.stderr)
        return 1
    finally:
        close()
    print(json.dumps(result, indent=2, default=str) if args.json else text, file=args.out)
    return 0

