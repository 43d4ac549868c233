"""The CLI's plain-text tables: one cell format, one table layout, and the views of registry
records and Serve status built from them."""

from __future__ import annotations


def cell(value) -> str:
    """One value as table text: None as "-", floats to 6 significant digits, lists and dicts comma-joined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(cell, value)) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain text table: numbers right-aligned, everything else left-aligned."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] is None for row in rows)
               and any(row[i] is not None for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _version_ref(version: dict) -> str:
    return f"{version['model']} v{version['version']}"


def format_versions(rows: list[dict], first_metrics: list[str]) -> str:
    if not rows:
        return "(no versions)"
    keys = sorted({k for r in rows for k in r["metrics"]})
    shown = [k for k in first_metrics if k in keys] + [k for k in keys if k not in first_metrics]
    more = len(shown) - 6
    shown = shown[:6]
    headers = ["version", "label", "format", "transformation", "parent", "aliases"] + shown + ["created_at"]
    table = format_table(headers, [
        [r["version"], r["label"], r["format"], r["transformation"],
         f"{r['parent']['model']} v{r['parent']['version']}" if r["parent"] else None, r["aliases"]]
        + [r["metrics"].get(k) for k in shown] + [r["created_at"][:19] + (" (deleted)" if r.get("deleted") else "")]
        for r in rows
    ])
    return table + (f"\n({more} more metrics: use --json)" if more > 0 else "")


def format_version(r: dict, lineage: dict) -> str:
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
    out = [f"{k.ljust(width)}  {cell(v)}" for k, v in fields]
    if r["metrics"]:
        out += ["", format_table(["metric", "value"], [[k, v] for k, v in sorted(r["metrics"].items())])]
    return "\n".join(out)


def format_compare(c: dict) -> str:
    a, b = c["a"], c["b"]
    out = [f"a: {_version_ref(a)} ({a['format']}, {a['transformation']})   b: {_version_ref(b)} ({b['format']}, {b['transformation']})", ""]
    out.append(format_table(["metric", "a", "b", "delta", "relative"], [
        [m["key"], m["a"], m["b"], m["delta"], None if m["relative"] is None else f"{m['relative']:+.1%}"] for m in c["metrics"]
    ]) if c["metrics"] else "metrics: none")
    out.append("")
    if c["config"]:
        out.append(format_table(["config key", "a", "b"], [[d["key"], d["a"], d["b"]] for d in c["config"]]))
    else:
        out.append("config: identical" + (" (same hash)" if c["same_config_hash"] else ""))
    if c["params"]:
        out += ["", format_table(["param", "a", "b"], [[d["key"], d["a"], d["b"]] for d in c["params"]])]
    d = c["dataset"]
    out += ["", f"dataset: {'same' if d['same'] else 'different'} ({cell(d['a'])} vs {cell(d['b'])})"]
    lin = c["lineage"]
    path = " -- ".join(f"{n['model']} v{n['version']} ({n['transformation']})" for n in lin["path"])
    out.append(f"lineage: {lin['relation']}" + (f": {path}" if path else ""))
    return "\n".join(out)


def format_eval_compare(c: dict) -> str:
    """`registry compare A B --eval FILE`: per metric A's and B's value, B - A, the paired test's p-value."""
    a, b, e = c["a"], c["b"], c["eval"]
    out = [f"a: {_version_ref(a)} ({a['format']})   b: {_version_ref(b)} ({b['format']})",
           f"eval: {e['data']}, {e['prompts']} prompts, greedy, max_new_tokens {e['max_new_tokens']}", ""]
    out.append(format_table(["metric", "a", "b", "delta", "p_value", "prompts"], [
        [m["metric"] + ("" if m["higher_is_better"] else " (lower is better)"), m["a"], m["b"], m["delta"],
         m["p_value"], m["prompts"]] for m in c["metrics"]
    ]))
    out += ["", f"p_value: {c['test']}"]
    return "\n".join(out)


def format_history(rows: list[dict]) -> str:
    if not rows:
        return "(no alias changes)"
    return format_table(["time", "alias", "action", "from", "to", "by", "reason"], [
        [h["created_at"], h["alias"], h["action"], h["from_version"], h["to_version"], h["actor"], h["reason"] or None]
        for h in rows
    ])


def format_serve_status(st: dict) -> str:
    if st["status"] == "NOT_RUNNING":
        return f"application {st['app']!r}: not running"
    lines = [f"application {st['app']!r}: {st['status']} at {st['url'].rstrip('/')}/api/v1/" + (f" ({st['message']})" if st["message"] else "")]
    lines += [f"  direct ingress: {url.rstrip('/')}/api/v1/" for url in st.get("replica_urls", [])]
    rows = []
    for m in st["models"]:
        for r in m["routes"]:
            rows.append([m["model"], r["route"], r["weight"], r["deployment"], r["status"], cell(r.get("replicas")),
                         r.get("serving_version"), r["registry_version"], r.get("backend")])
    lines += ["", format_table(["model", "route", "weight", "deployment", "status", "replicas", "serving", "registry", "backend"], rows)]
    for name, d in st.get("other_deployments", {}).items():
        lines.append(f"{name}: {d['status']} {cell(d['replicas'])}")
    for rb in st.get("rollouts", {}).get("rollbacks", []):
        lines.append(f"auto-rollback: {rb['model']} {rb['alias']} v{rb['from_version']} -> "
                     + (f"v{rb['to_version']}" if rb["to_version"] else f"refused ({rb['error']})") + f": {rb['reason']}")
    return "\n".join(lines)

