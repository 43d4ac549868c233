"""RegistryStore's schema-v2 features, on SQLite and PostgreSQL alike (`store` runs on both):
params / label / dataset fingerprint, artifact URI rules, metric history and batches, many
concurrent writers, list / filter / sort, lineage, compare, alias history with as_of and
rollback, and soft delete."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from actors.registry.errors import RegistryConflict, RegistryNotFound
from actors.registry.store import RegistryStore


@pytest.fixture
def store(registry_db_url):
    s = RegistryStore(registry_db_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    """For checks that never reach the database (input validation): no need to run them twice."""
    s = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    yield s
    s.close()


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


US = timedelta(microseconds=1)

# ----------------------------------------------------------------------------- record fields


def test_params_label_and_dataset_fingerprint_are_stored(store):
    rec = store.register_version(
        "gpt", "/ckpt/gpt/1", "torch_fp32", params={"lr": 0.003, "optimizer": "adamw", "amp": True, "warmup": 10,
                                                     "scheduler": None},
        dataset_fingerprint="lm-code:3f2a9c", label="1.0.0",
    )
    assert rec["params"] == {"amp": True, "lr": 0.003, "optimizer": "adamw", "scheduler": None, "warmup": 10}
    assert (rec["label"], rec["dataset_fingerprint"], rec["deleted"]) == ("1.0.0", "lm-code:3f2a9c", None)
    assert store.get_version("gpt", 1) == rec
    # labels are unique within a model (not across models), and optional
    with pytest.raises(RegistryConflict, match=r"label '1.0.0' is already version 1 of model 'gpt'"):
        store.register_version("gpt", "/ckpt/gpt/2", "torch_fp32", label="1.0.0")
    assert store.register_version("vit", "/ckpt/vit/1", "torch_fp32", label="1.0.0")["label"] == "1.0.0"
    assert store.register_version("gpt", "/ckpt/gpt/2", "torch_fp32")["label"] is None
    assert store.register_version("gpt", "/ckpt/gpt/3", "torch_fp32")["version"] == 3  # two NULL labels coexist


@pytest.mark.parametrize("kwargs, message", [
    ({"params": {"opt": {"name": "adam"}}}, "param 'opt' must be a string, number, bool or None"),
    ({"params": {"lr": float("nan")}}, "param 'lr' must be finite"),
    ({"params": ["lr"]}, "params must be a dict"),
    ({"label": "has space"}, "label 'has space' is invalid"),
    ({"dataset_fingerprint": ""}, "dataset_fingerprint must be a non-empty string"),
])
def test_bad_params_label_fingerprint_refused(sqlite_store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sqlite_store.register_version("gpt", "/ckpt", "torch_fp32", **kwargs)
    assert sqlite_store.list_models() == []


@pytest.mark.parametrize("uri", [
    "/runs/gpt/artifacts/v1", "file:///runs/gpt/v1", "s3://bucket/gpt/v1", "gs://bucket/gpt/v1",
    "gcs://bucket/gpt", "hdfs://namenode:8020/models/gpt", "abfss://models@acct.dfs.core.windows.net/gpt",
    "/runs/gpt/./v1", "/runs/gpt..v1/x",
])
def test_artifact_uris_accepted(sqlite_store, uri):
    assert sqlite_store.register_version("gpt", uri, "torch_fp32")["artifact_uri"] == uri


@pytest.mark.parametrize("uri, message", [
    ("runs/gpt/v1", "must be an absolute path or a URI"),
    ("../gpt/v1", "must be an absolute path or a URI"),
    ("/runs/gpt/../../etc/passwd", "'..' segment"),
    ("/runs/..", "'..' segment"),
    ("s3://bucket/gpt/../../other-team/model", "'..' segment"),
    ("file:///runs/%2e%2e/secrets", "'..' segment"),
    ("s3://bucket/a/%2E%2E/b", "'..' segment"),
    ("http://example.com/model.bin", "scheme 'http', which is not one of"),
    ("ftp://host/model", "scheme 'ftp'"),
    ("mock:///x", "scheme 'mock'"),
    ("javascript://x", "scheme 'javascript'"),
    ("s3:///key-without-bucket", "names no bucket or host"),
    ("s3://../x", "names no bucket or host"),
    ("file://otherhost/x", "file:///absolute/path"),
    ("/runs/gpt\\..\\..\\x", "backslash"),
    ("/runs/gpt/v1\n", "control character"),
    ("s3://bucket/k#frag", "#fragment"),
])
def test_artifact_uris_refused(sqlite_store, uri, message):
    with pytest.raises(ValueError, match=message):
        sqlite_store.register_version("gpt", uri, "torch_fp32")
    assert sqlite_store.list_models() == []


# ----------------------------------------------------------------------------- metrics


def test_metric_batches_and_history(store):
    store.register_version("gpt", "/ckpt/gpt/1", "torch_fp32", metrics={"val_loss": 3.0})
    curve = [{"step": s, "metrics": {"train_loss": 4.0 - s / 100, "lr": 1e-3}} for s in range(0, 300, 10)]
    assert store.log_metrics_batch("gpt", 1, curve) == 60
    assert store.log_metrics("gpt", "latest", {"val_loss": 2.5}, step=300) == 1
    history = store.metric_history("gpt", 1, "train_loss")
    assert [(h["step"], h["value"]) for h in history] == [(s, 4.0 - s / 100) for s in range(0, 300, 10)]
    assert [h["value"] for h in store.metric_history("gpt", 1, "val_loss")] == [3.0, 2.5]
    assert len(store.metric_history("gpt", 1)) == 62
    assert store.get_version("gpt", 1)["metrics"] == {"lr": 1e-3, "train_loss": 4.0 - 290 / 100, "val_loss": 2.5}
    # a bad point refuses the whole batch
    with pytest.raises(ValueError, match="metric 'train_loss' must be finite"):
        store.log_metrics_batch("gpt", 1, [{"step": 400, "metrics": {"lr": 1.0}}, {"step": 410, "metrics": {"train_loss": float("inf")}}])
    with pytest.raises(ValueError, match=r"points\[0\] must be"):
        store.log_metrics_batch("gpt", 1, [{"step": 1, "values": {}}])
    with pytest.raises(RegistryNotFound, match="no version 9"):
        store.log_metrics_batch("gpt", 9, curve)
    assert len(store.metric_history("gpt", 1)) == 62


def test_eight_concurrent_writers_times_200_metric_writes_all_land(store, registry_db_url):
    """Eight writers, each with its own connection (like eight Tune trials reporting), 200 calls each."""
    store.register_version("gpt", "/ckpt/gpt/1", "torch_fp32")
    writers = [RegistryStore(registry_db_url) for _ in range(8)]
    start = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def write(i: int, w: RegistryStore) -> None:
        start.wait()
        try:
            for step in range(200):
                assert w.log_metrics("gpt", 1, {f"writer{i}": float(step)}, step=step) == 1
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i, w)) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    assert errors == []
    history = store.metric_history("gpt", 1)
    assert len(history) == 1600
    for i in range(8):
        assert [h["step"] for h in history if h["key"] == f"writer{i}"] == list(range(200))


# ----------------------------------------------------------------------------- list / filter / sort


def _populate_for_listing(store) -> None:
    store.register_version("gpt", "/a/1", "torch_fp32", metrics={"val_loss": 2.4, "latency_ms": 9.0}, tags={"team": "a"})
    store.register_version("gpt", "/a/2", "torch_int8", metrics={"val_loss": 2.5, "latency_ms": 3.0},
                           parent={"model": "gpt", "version": 1}, transformation="quantized", tags={"team": "b"})
    store.register_version("gpt", "/a/3", "onnx_int8", metrics={"val_loss": 2.7, "latency_ms": 1.5},
                           parent={"model": "gpt", "version": 1}, transformation="quantized", tags={"team": "a"})
    store.register_version("gpt", "/a/4", "torch_fp32", tags={"team": "a"})  # no metrics yet


def test_list_filter_and_sort_by_metric(store):
    _populate_for_listing(store)
    numbers = lambda records: [r["version"] for r in records]  # noqa: E731
    assert numbers(store.list_versions("gpt")) == [1, 2, 3, 4]
    assert numbers(store.list_versions("gpt", descending=True)) == [4, 3, 2, 1]
    assert numbers(store.list_versions("gpt", order_by="latency_ms")) == [3, 2, 1, 4]  # no metric: last
    assert numbers(store.list_versions("gpt", order_by="val_loss", descending=True)) == [3, 2, 1, 4]
    assert numbers(store.list_versions("gpt", order_by="latency_ms", limit=2)) == [3, 2]
    assert numbers(store.list_versions("gpt", where="val_loss<2.6")) == [1, 2]
    assert numbers(store.list_versions("gpt", where=["val_loss <= 2.5", "latency_ms<5"])) == [2]
    assert numbers(store.list_versions("gpt", where="val_loss!=2.5")) == [1, 3]
    assert numbers(store.list_versions("gpt", format="torch_fp32")) == [1, 4]
    assert numbers(store.list_versions("gpt", transformation="quantized", order_by="latency_ms")) == [3, 2]
    assert numbers(store.list_versions("gpt", tags={"team": "a"}, where="latency_ms>1")) == [1, 3]
    assert numbers(store.list_versions("gpt", order_by="created_at", descending=True)) == [4, 3, 2, 1]
    for bad in ("val_loss", "val_loss<abc", "<2", "val_loss<nan"):
        with pytest.raises(ValueError, match="metric filter"):
            store.list_versions("gpt", where=bad)
    with pytest.raises(ValueError, match="limit"):
        store.list_versions("gpt", limit=0)


# ----------------------------------------------------------------------------- lineage and compare

CONFIG_A = {"model": {"kind": "gpt", "d_model": 64}, "train": {"lr": 0.003, "steps": 200}, "data": {"name": "lm-code"}}
CONFIG_B = {"model": {"kind": "gpt", "d_model": 64}, "train": {"lr": 0.001, "steps": 400, "warmup_steps": 20},
            "data": {"name": "lm-code"}}


def _populate_family(store) -> None:
    store.register_version("gpt", "/f/1", "torch_fp32", config=CONFIG_A, params={"lr": 0.003, "steps": 200},
                           metrics={"val_loss": 2.0, "accuracy": 0.80}, dataset_fingerprint="data:aaa")
    store.register_version("gpt", "/f/2", "torch_int8", config=CONFIG_A, parent={"model": "gpt", "version": 1},
                           transformation="quantized", metrics={"val_loss": 2.1, "accuracy": 0.79, "latency_ms": 1.0},
                           dataset_fingerprint="data:aaa")
    store.register_version("gpt", "/f/3", "torch_fp32", config=CONFIG_B, parent={"model": "gpt", "version": 1},
                           transformation="tuned", params={"lr": 0.001, "steps": 400},
                           metrics={"val_loss": 1.8, "accuracy": 0.84}, dataset_fingerprint="data:bbb")
    store.register_version("gpt-distilled", "/f/d1", "torch_fp32", parent={"model": "gpt", "version": 3},
                           transformation="distilled", metrics={"val_loss": 1.9})
    store.register_version("other", "/o/1", "torch_fp32", metrics={"val_loss": 5.0})


def test_lineage_walks_to_the_root_and_lists_children(store):
    _populate_family(store)
    lin = store.lineage("gpt-distilled", 1)
    assert [(n["model"], n["version"], n["transformation"]) for n in lin["path"]] == [
        ("gpt", 1, "trained"), ("gpt", 3, "tuned"), ("gpt-distilled", 1, "distilled"),
    ]
    assert lin["children"] == []
    root = store.lineage("gpt", 1)
    assert [(n["model"], n["version"]) for n in root["path"]] == [("gpt", 1)]
    assert [(n["model"], n["version"]) for n in root["children"]] == [("gpt", 2), ("gpt", 3)]


def test_compare_metric_deltas_config_diff_and_lineage_path(store):
    _populate_family(store)
    cmp = store.compare("gpt", 2, 3)
    assert (cmp["a"]["version"], cmp["b"]["version"]) == (2, 3)
    deltas = {m["key"]: m for m in cmp["metrics"]}
    assert set(deltas) == {"accuracy", "latency_ms", "val_loss"}
    assert deltas["val_loss"]["a"] == 2.1 and deltas["val_loss"]["b"] == 1.8
    assert deltas["val_loss"]["delta"] == pytest.approx(-0.3)
    assert deltas["val_loss"]["relative"] == pytest.approx(-0.3 / 2.1)
    assert deltas["accuracy"]["delta"] == pytest.approx(0.05)
    assert deltas["latency_ms"] == {"key": "latency_ms", "a": 1.0, "b": None, "delta": None, "relative": None}
    # only the config keys that differ, as dotted paths; a key absent on one side shows None
    assert cmp["config"] == [
        {"key": "train.lr", "a": 0.003, "b": 0.001},
        {"key": "train.steps", "a": 200, "b": 400},
        {"key": "train.warmup_steps", "a": None, "b": 20},
    ]
    assert cmp["same_config_hash"] is False
    assert cmp["params"] == [{"key": "lr", "a": None, "b": 0.001}, {"key": "steps", "a": None, "b": 400}]
    assert cmp["dataset"] == {"a": "data:aaa", "b": "data:bbb", "same": False}
    lineage = cmp["lineage"]
    assert lineage["relation"].startswith("siblings")
    assert (lineage["common_ancestor"]["model"], lineage["common_ancestor"]["version"]) == ("gpt", 1)
    assert [n["version"] for n in lineage["path"]] == [2, 1, 3]

    direct = store.compare("gpt", 1, 2)
    assert direct["config"] == [] and direct["same_config_hash"] is True
    assert direct["lineage"]["relation"] == "b descends from a"
    assert [n["version"] for n in direct["lineage"]["path"]] == [1, 2]

    across = store.compare("gpt-distilled", 1, 1, model_b="gpt")
    assert across["lineage"]["relation"] == "a descends from b"
    assert [(n["model"], n["version"]) for n in across["lineage"]["path"]] == [("gpt-distilled", 1), ("gpt", 3), ("gpt", 1)]

    unrelated = store.compare("gpt", 1, 1, model_b="other")
    assert unrelated["lineage"] == {"common_ancestor": None, "path": [], "relation": "unrelated: no common ancestor"}
    assert store.compare("gpt", "latest", 3)["lineage"]["relation"] == "same version"


# ----------------------------------------------------------------------------- aliases: history, as_of, rollback


def test_promote_promote_rollback_as_of_each_window(store):
    for i in range(2):
        store.register_version("gpt", f"/h/{i}", "torch_fp32")
    before = datetime.now(timezone.utc)
    store.set_alias("gpt", "production", 1, reason="first release", actor="alice")
    store.set_alias("gpt", "production", 2, reason="v2 has lower val_loss", actor="bob")
    back = store.rollback_alias("gpt", "production", reason="v2 doubled p99 latency", actor="oncall")
    assert back == {"model": "gpt", "alias": "production", "version": 1, "from_version": 2, "changed": True}
    assert store.aliases("gpt") == {"production": 1}

    history = store.alias_history("gpt", "production")
    assert [(h["action"], h["from_version"], h["to_version"], h["reason"], h["actor"]) for h in history] == [
        ("set", None, 1, "first release", "alice"),
        ("set", 1, 2, "v2 has lower val_loss", "bob"),
        ("rollback", 2, 1, "v2 doubled p99 latency", "oncall"),
    ]
    t1, t2, t3 = (_t(h["created_at"]) for h in history)
    assert before <= t1 < t2 < t3  # strictly increasing, so the windows below never overlap

    def at(when) -> int | None:
        return store.as_of("gpt", "production", when)["version"]

    assert at(t1 - US) is None  # before the first promotion: nothing was in production
    assert at(t1) == 1 and at(t1 + (t2 - t1) / 2) == 1 and at(t2 - US) == 1
    assert at(t2) == 2 and at(t3 - US) == 2
    assert at(t3) == 1 and at(datetime.now(timezone.utc) + timedelta(days=1)) == 1
    # ISO strings work, and a naive time is UTC
    assert at(t2.isoformat()) == 2
    assert at(t2.replace(tzinfo=None)) == 2
    assert at((t2 - US).astimezone(timezone(timedelta(hours=5))).isoformat()) == 1
    answer = store.as_of("gpt", "production", t2)
    assert (answer["since"], answer["action"], answer["reason"], answer["actor"]) == (
        t2.isoformat(), "set", "v2 has lower val_loss", "bob")
    with pytest.raises(RegistryNotFound, match="never had an alias 'staging'"):
        store.as_of("gpt", "staging", t2)
    with pytest.raises(ValueError, match="not ISO 8601"):
        store.as_of("gpt", "production", "yesterday")


def test_rollback_walks_back_one_move_at_a_time(store):
    for i in range(3):
        store.register_version("gpt", f"/r/{i}", "torch_fp32")
    for v in (1, 2, 3):
        store.set_alias("gpt", "production", v)
    assert store.rollback_alias("gpt", "production")["version"] == 2
    assert store.rollback_alias("gpt", "production")["version"] == 1
    with pytest.raises(RegistryConflict, match="no earlier holder"):
        store.rollback_alias("gpt", "production")
    with pytest.raises(RegistryNotFound, match="never had an alias 'canary'"):
        store.rollback_alias("gpt", "canary")
    # a move after rollbacks starts a new step to undo
    store.set_alias("gpt", "production", 3)
    assert store.rollback_alias("gpt", "production")["version"] == 1
    assert [h["action"] for h in store.alias_history("gpt", "production")] == [
        "set", "set", "set", "rollback", "rollback", "set", "rollback"]


def test_remove_alias_is_recorded_and_undone_by_rollback(store):
    for i in range(2):
        store.register_version("gpt", f"/x/{i}", "torch_fp32")
    store.set_alias("gpt", "staging", 1)
    store.set_alias("gpt", "staging", 2)
    removed = store.remove_alias("gpt", "staging", reason="canary over", actor="ci")
    assert removed == {"model": "gpt", "alias": "staging", "version": None, "from_version": 2, "changed": True}
    assert store.aliases("gpt") == {}
    last = store.alias_history("gpt", "staging")[-1]
    assert (last["action"], last["from_version"], last["to_version"], last["reason"]) == ("remove", 2, None, "canary over")
    assert store.as_of("gpt", "staging", datetime.now(timezone.utc))["version"] is None
    with pytest.raises(RegistryNotFound, match="no alias 'staging' to remove"):
        store.remove_alias("gpt", "staging")
    assert store.rollback_alias("gpt", "staging")["version"] == 2  # back to the holder before the removal
    assert store.rollback_alias("gpt", "staging")["version"] == 1


# ----------------------------------------------------------------------------- delete


def test_delete_is_refused_while_an_alias_points_at_the_version(store):
    for i in range(3):
        store.register_version("gpt", f"/d/{i}", "torch_fp32")
    store.set_alias("gpt", "production", 2)
    store.set_alias("gpt", "staging", 2)
    with pytest.raises(RegistryConflict, match=r"production, staging point at.*force"):
        store.delete_version("gpt", 2)
    with pytest.raises(RegistryConflict, match="production, staging"):
        store.delete_version("gpt", "production")
    assert store.get_version("gpt", 2)["deleted"] is None

    done = store.delete_version("gpt", 2, force=True, reason="license problem", actor="legal")
    assert (done["version"], done["forced"], done["aliases_removed"]) == (2, True, ["production", "staging"])
    assert store.aliases("gpt") == {}
    for alias in ("production", "staging"):
        last = store.alias_history("gpt", alias)[-1]
        assert (last["action"], last["from_version"], last["to_version"], last["actor"]) == ("delete", 2, None, "legal")
        assert "version 2 deleted (forced): license problem" == last["reason"]
        assert store.as_of("gpt", alias, datetime.now(timezone.utc))["version"] is None
    with pytest.raises(RegistryConflict, match="it was deleted"):
        store.rollback_alias("gpt", "production")


def test_deleted_versions_leave_lists_and_refs_but_keep_lineage_and_numbers(store):
    store.register_version("gpt", "/d/1", "torch_fp32")
    store.register_version("gpt", "/d/2", "torch_int8", parent={"model": "gpt", "version": 1}, transformation="quantized")
    store.register_version("gpt", "/d/3", "torch_fp32")
    plain = store.delete_version("gpt", 1, reason="superseded")
    assert (plain["forced"], plain["aliases_removed"]) == (False, [])
    store.delete_version("gpt", "latest")  # v3
    with pytest.raises(RegistryNotFound, match=r"version 1 of model 'gpt' was deleted at .* by cli \(superseded\)"):
        store.get_version("gpt", 1)
    with pytest.raises(RegistryNotFound, match="was deleted"):
        store.delete_version("gpt", 1)
    with pytest.raises(RegistryNotFound, match="was deleted"):
        store.set_alias("gpt", "production", 1)
    with pytest.raises(RegistryNotFound, match="was deleted"):
        store.log_metrics("gpt", 1, {"x": 1.0})
    deleted = store.get_version("gpt", 1, include_deleted=True)["deleted"]
    assert (deleted["by"], deleted["reason"], deleted["forced"]) == ("cli", "superseded", False)
    assert [v["version"] for v in store.list_versions("gpt")] == [2]
    assert [v["version"] for v in store.list_versions("gpt", include_deleted=True)] == [1, 2, 3]
    assert store.get_version("gpt", "latest")["version"] == 2
    assert store.get_version("gpt", 2)["parent"] == {"model": "gpt", "version": 1}  # lineage survives
    assert [n["deleted"] for n in store.lineage("gpt", 2)["path"]] == [True, False]
    [summary] = store.list_models()
    assert (summary["versions"], summary["latest"], summary["deleted"]) == (1, 2, 2)
    assert store.register_version("gpt", "/d/4", "torch_fp32")["version"] == 4  # numbers are never reused
