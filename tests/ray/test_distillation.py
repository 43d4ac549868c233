"""Distillation: a small student trained against a registered teacher beats the same student
trained without it, for the same steps and seeds; the registry records the teacher as parent.

Numbers (digits, 2 DDP workers, fixed seeds, deterministic on CPU): the teacher (ViT d=64, 2
layers) reaches ~0.9 accuracy; a 1-layer d=16 student gets a few points more accuracy and a
lower loss with soft targets (alpha 0.1, T 2) than with labels alone.
"""

from __future__ import annotations

import uuid

import pytest
import ray

from actors.registry.client import get_or_create_registry
from app.config.registry import RegistryConfig
from app.config.jobs import TrainJob
from local_ranks import LocalRanks
from pipelines.register import train_and_register

pytestmark = pytest.mark.ray


def _job(root, name, model, steps, lr, distill=None) -> TrainJob:
    return TrainJob.model_validate({
        "name": name, "storage_path": str(root), "registry": {"actor_name": "unused", "db_url": f"sqlite:///{root}/r.db"},
        "model": {"kind": "vit", **model}, "data": {"name": "digits"},
        "train": {"num_workers": 2, "steps": steps, "batch_size": 16, "lr": lr, "warmup_steps": 5,
                  "eval_every": steps, "checkpoint_every": steps, "log_every": steps, "distill": distill},
    })


def test_student_with_teacher_beats_student_without(ray_cluster, tmp_path):
    cfg = RegistryConfig(actor_name=f"distill-{uuid.uuid4().hex[:6]}", db_url=f"sqlite:///{tmp_path}/registry.db")
    registry = get_or_create_registry(cfg)
    try:
        student = {"d_model": 16, "n_layer": 1, "n_head": 2}
        # The teacher and the plain student train on two local ranks (the loop a Ray Train worker
        # runs, without Ray Train's start-up for each) and are registered as trained runs are; the
        # student with the teacher goes the user's way, through Ray Train and the registry.
        with LocalRanks(2) as ranks:
            teacher = ranks.fit_and_register(_job(tmp_path, "teacher", {"d_model": 64, "n_layer": 2}, 300, 3e-3), registry)
            plain = ranks.fit_and_register(_job(tmp_path, "student-plain", student, 150, 1e-2), registry)
        ray.get(registry.set_alias.remote("teacher", "production", teacher["version"], reason="distillation teacher"))
        kd = train_and_register(_job(tmp_path, "student-kd", student, 150, 1e-2,
                                     {"teacher": "teacher", "teacher_version": "production", "alpha": 0.1, "temperature": 2.0}), registry)
    finally:
        ray.kill(registry)
    assert teacher["metrics"]["val_accuracy"] > kd["metrics"]["val_accuracy"]  # a teacher worth learning from
    assert kd["metrics"]["val_accuracy"] > plain["metrics"]["val_accuracy"], (kd["metrics"], plain["metrics"])
    assert kd["metrics"]["val_loss"] < plain["metrics"]["val_loss"]
    assert kd["transformation"] == "distilled" and kd["parent"] == {"model": "teacher", "version": teacher["version"]}
    assert plain["transformation"] == "trained" and plain["parent"] is None
