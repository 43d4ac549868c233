"""Temper's command line: `python -m app VERB CONFIG [key.sub=value ...]` (also installed as `temper`).

Verbs:
  run CONFIG        train -> register -> compress -> serve -> one client call (OptimizeJob)
  train CONFIG      train with Ray Train and register the result (TrainJob)
  compress CONFIG   compress a registered version into new versions (CompressJob)
  tune CONFIG       Ray Tune sweep over training; the best trial is registered (TuneJob)
  tune --resume NAME   continue an interrupted sweep by its name
  serve ACTION CONFIG   Ray Serve (ServeApp): deploy | status | shutdown | advise | config (`serve CONFIG` deploys)
  registry ACTION   the model registry: list | show | compare | alias | rollback | history | delete | audit
  auth ACTION       API keys in the registry database: create-key | list-keys | revoke
  data stats CONFIG   rows, token lengths, labels, duplicates and train/val overlap of a text dataset
  validate KIND CONFIG   check a config without running it
  schema            print the configuration reference (Markdown) generated from the pydantic models
  status            the cluster, running jobs and trials, the registry and Serve applications, in one screen

`--verbose` (anywhere) or TEMPER_VERBOSE=1 shows Ray's own log lines too. `--json` prints only
JSON on stdout. A config error exits with status 2 and names the key; any other mistake of the
user (a missing model or version, an unreadable artifact) exits 1 with one line; a failed job
exits 1.

This module parses and dispatches; the verbs live in `jobs`, `serve`, `registry`, `auth` and `data`.
"""

from __future__ import annotations

import argparse
import os
import sys

from app.cli.console import error_message, results_stream
from app.auth.identity import ROLES
from app.cli.auth import cmd_auth
from app.cli.data import cmd_data
from app.cli.jobs import cmd_compress, cmd_run, cmd_schema, cmd_train, cmd_tune, cmd_validate
from app.cli.registry import cmd_registry
from app.cli.serve import SERVE_ACTIONS, cmd_serve
from app.cli.status import cmd_status
from app.config.base import ConfigError
from app.config.jobs import JOB_KINDS
from app.errors import TemperError
from app.runtime import VERBOSE_ENV

VERBOSE_HELP = f"also show Ray's own log lines (start-up, Ray Train's per-report lines); same as {VERBOSE_ENV}=1"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys (values parsed as YAML)")


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
    a.add_argument("--eval", metavar="EVAL_FILE", help="evaluate both causal-LM versions on the prompts of this eval "
                   "file (data, max_new_tokens, metrics) instead: per-metric A, B, delta and a paired p-value")

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

    a = action("audit", "the audit log: who did (or was refused) what, when, before and after")
    a.add_argument("--model", help="only rows about this model")
    a.add_argument("--since", metavar="TIME", help="only rows at or after this ISO 8601 time (naive = UTC)")
    a.add_argument("--limit", type=int, help="only the newest N rows")

    a = action("delete", "soft-delete a version; refused while an alias points at it unless --force", by=True)
    a.add_argument("--model", help="model name")
    a.add_argument("--version", help="version number (or alias, which needs --force)")
    a.add_argument("--force", action="store_true", help="also remove the aliases pointing at it (recorded in the history)")

    for name, a in actions.choices.items():
        if name != "compare":
            a.add_argument("overrides", nargs="*", metavar="registry.key=value", help="override registry config keys")

    p = sub.add_parser("auth", help="API keys in the registry database: create-key | list-keys | revoke")
    auth_actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = auth_actions.add_parser("create-key", help="make an API key; it is printed once and never stored")
    a.add_argument("name", help="who or what the key is for (unique, e.g. ci or alice)")
    a.add_argument("--role", required=True, choices=ROLES, help="what the key may do")
    a.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 90m (default: never)")
    a = auth_actions.add_parser("list-keys", help="every key: name, id, role, status, dates (never the key)")
    a = auth_actions.add_parser("revoke", help="revoke a key by name or key id; it authenticates no more")
    a.add_argument("name", help="key name or key id")
    for a in auth_actions.choices.values():
        a.add_argument("--config", help="a config whose `registry` and `auth` sections to use (default: built-in defaults)")
        a.add_argument("--json", action="store_true", help="print JSON")
        a.add_argument("overrides", nargs="*", metavar="registry.key=value", help="override registry.* or auth.* keys")
        a.set_defaults(fn=cmd_auth)

    p = sub.add_parser("data", help="look at a text dataset before training: data stats CONFIG")
    data_actions = p.add_subparsers(dest="action", required=True)
    a = data_actions.add_parser("stats", help="rows, token lengths, over max_length, labels, duplicates, train/val overlap")
    _add_config_args(a)
    a.add_argument("--json", action="store_true", help="print the numbers as JSON")
    a.set_defaults(fn=cmd_data)

    p = sub.add_parser("validate", help="validate a config file")
    p.add_argument("kind", choices=sorted(JOB_KINDS))
    _add_config_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("schema", help="print the configuration reference")
    p.set_defaults(fn=cmd_schema)

    p = sub.add_parser("status", help="cluster, running jobs and trials, registry and Serve applications in one screen")
    p.add_argument("--config", help="a config whose `registry` section to read (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="registry.key=value", help="override registry config keys")
    p.set_defaults(fn=cmd_status)

    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    _add_verbose_everywhere(sub)
    return parser


def _add_verbose_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """`--verbose` after the verb too (`run C --verbose`); absent there, the top-level value stands."""
    for p in subparsers.choices.values():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_verbose_everywhere(nested[0])
        else:
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


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
    if extra and args.verb in ("registry", "auth") and not any(x.startswith("-") for x in extra):
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
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read where Ray is started (app.runtime), here and in subprocesses
    try:
        with results_stream(json_only=getattr(args, "json", False)) as args.out:
            return args.fn(args)
    except ConfigError as err:
        print(f"config error: {error_message(err)}", file=sys.stderr)
        return 2
    except TemperError as err:  # a missing model or version, an unreadable artifact: the message says which
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 1

