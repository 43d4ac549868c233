"""Where the training loop reports and finds its checkpoints: Ray Train's session on a Ray Train
worker, or a local session when the loop runs in the calling process.

The loop (pipelines/train.py) asks `current()` for its rank, world size, device, the checkpoint
to resume from, the dataset shard it streams, and where to report metrics and checkpoints. On a
Ray Train worker every answer comes from `ray.train`. `LocalSession` answers the same questions
for a run inside existing processes (pipelines/train.fit_in_process: a Tune trial, or each rank
of a process group the caller set up, as torchrun does), in Ray Train's checkpoint layout (a local
run resumes from the newest whole folder; Ray Train resumes from its own snapshot file, so a run
keeps the runner it started with):

    <storage>/train/<name>/checkpoint_step<8 digits>/   one folder per checkpoint, written under
                                                        a `.partial` name and renamed when whole;
                                                        the newest `keep_last` are kept

Why a local runner at all: a one-worker TorchTrainer inside a Tune trial starts a controller
actor and a worker actor (two more processes importing torch and Ray Train, tens of seconds on a
busy 2-core machine, per trial) to run what the trial's own process can run.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

CHECKPOINT_DIR = re.compile(r"checkpoint_step(\d{8})")


class RayTrainSession:
    """The loop's view of Ray Train (inside `train_loop_per_worker` on a TorchTrainer worker)."""

    def rank_and_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        """The checkpoint Ray Train restored for this run (None on a fresh start)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, folder: Path | None = None, dir_name: str | None = None) -> None:
        """Metrics, with this rank's part of a checkpoint in `folder` (Ray merges the ranks' parts)."""
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=dir_name if ckpt else None)


class LocalSession:
    """One worker in this process: rank `rank` of `world` (0 of 1 unless the caller's process group
    is larger), checkpoints under `run_dir` (Ray Train's layout), every report handed to
    `on_report(metrics, checkpoint path or None)`."""

    def __init__(self, run_dir: Path, keep_last: int, use_gpu: bool,
                 on_report: Callable[[dict, str | None], None] | None = None, rank: int = 0, world: int = 1):
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)
        self.use_gpu = use_gpu
        self.on_report = on_report
        self.rank, self.world = rank, world
        self.latest_metrics: dict | None = None

    def rank_and_world(self) -> tuple[int, int]:
        return self.rank, self.world

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def checkpoints(self) -> list[Path]:
        """Whole checkpoint folders of this run, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def dataset_shard(self, name: str):
        raise RuntimeError("a streamed dataset needs Ray Train workers; fit_in_process refuses streamed data")

    def report(self, metrics: dict, folder: Path | None = None, dir_name: str | None = None) -> None:
        """Every rank calls it with its part of the checkpoint (or None where it wrote nothing); the
        parts are merged into one folder, as Ray Train merges its workers' uploads."""
        path = None
        if folder is not None or dir_name is not None:  # a checkpoint report (every rank, parts or not)
            target = self.run_dir / (dir_name or f"checkpoint_step{int(metrics.get('step', 0)):08d}")
            partial = target.with_name(target.name + ".partial")
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self._barrier()
            if folder is not None:
                shutil.copytree(folder, partial, dirs_exist_ok=True)
            self._barrier()
            if self.rank == 0 and partial.exists():
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
                for old in self.checkpoints()[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            self._barrier()
            path = target if target.exists() else None
        self.latest_metrics = dict(metrics)
        if self.on_report is not None:
            self.on_report(dict(metrics), str(path) if path else None)


_current: LocalSession | None = None


def current() -> RayTrainSession | LocalSession:
    """The session of the loop running in this process."""
    return _current if _current is not None else RayTrainSession()


@contextlib.contextmanager
def local(session: LocalSession) -> Iterator[LocalSession]:
    """Run a loop in this process under `session` (one at a time per process)."""
    global _current
    if _current is not None:
        raise RuntimeError("a training loop is already running in this process")
    _current = session
    try:
        yield session
    finally:
        _current = None
