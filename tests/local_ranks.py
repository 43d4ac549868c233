"""Two (or N) long-lived processes in one gloo process group that run training jobs rank by rank
through `pipelines.train.fit_in_process`, the loop a Ray Train worker runs.

Why: a Ray Train fit starts a controller and one actor process per worker, each importing torch,
DeepSpeed and Ray Train (about 15 s of a tiny 2-worker fit on 2 cores); the strategy and pruning
matrices run dozens of such fits whose assertions are about the distributed math (losses, shards,
checkpoints, resume), not about Ray. Here the ranks start once per test module and run every fit of
it one after the other, each rank on one thread as a Ray Train worker of 1 CPU. What needs Ray
(worker failure and restart, Ray Train's checkpoint registration, streamed data) stays on Ray.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from typing import Callable

from conftest import free_port


def _rank_main(rank: int, world: int, port: int, jobs, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from app.config.jobs import TrainJob
    from pipelines.train import fit_in_process

    while (item := jobs.get()) is not None:
        job, resume_from = item
        try:
            result = fit_in_process(TrainJob.model_validate(job), resume_from=resume_from)
            results.put((rank, "ok", result))
        except BaseException:  # noqa: BLE001 - reported to the test, which raises it
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class LocalRanks:
    """`with LocalRanks(2) as ranks: result = ranks.fit(job)`: rank 0's TrainResult."""

    def __init__(self, world: int = 2, timeout_s: float = 300.0):
        self.world, self.timeout_s = world, timeout_s
        self.broken: str | None = None

    def __enter__(self) -> "LocalRanks":
        ctx = mp.get_context("spawn")
        port = free_port()
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_rank_main, args=(r, self.world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(self.world)]
        for p in self.procs:
            p.start()
        return self

    def fit(self, job, resume_from: str | None = None):
        """Every rank runs `job` (`resume_from` as in `pipelines.train.fit`); rank 0's result."""
        assert job.train.num_workers == self.world, (job.train.num_workers, self.world)
        if self.broken:
            raise RuntimeError(f"{job.name}: not run, an earlier fit left the ranks broken: {self.broken}")
        for q in self.jobs:
            q.put((job.model_dump(mode="json"), resume_from))
        answers = {}
        for _ in range(self.world):
            try:
                rank, status, value = self.results.get(timeout=self.timeout_s)
            except queue.Empty:
                self.broken = f"{job.name} timed out"
                raise TimeoutError(f"{job.name}: a rank did not finish in {self.timeout_s:.0f} s "
                                   f"(alive: {[p.is_alive() for p in self.procs]})") from None
            if status != "ok":  # the other ranks may wait in a collective for ever: the group is done
                self.broken = f"{job.name} failed"
                raise RuntimeError(f"{job.name} failed on rank {rank}:\n{value}")
            answers[rank] = value
        return answers[0]

    def fit_and_register(self, job, registry) -> dict:
        """`fit(job)`, then its result registered as a `trained` version of `job.name`, as
        `pipelines.register.train_and_register` registers a Ray Train run; the version record."""
        from pipelines.register import register_trained

        result = self.fit(job)
        record, _ = register_trained(registry, job, result.artifact_path, config_hash=result.config_hash,
                                     metrics=result.metrics, transformation="trained", tags={"run": job.name})
        return record

    def fit_all(self, plan: dict) -> "Callable[[object], object]":
        """Run every plan entry (key -> one job, or several run in turn: a paused run and its resume)
        now, one after the other; returns `result(key)`: its TrainResult (a tuple for several), or
        its failure raised in the test that reads it."""
        done: dict = {}
        for key, jobs in plan.items():
            jobs = jobs if isinstance(jobs, (list, tuple)) else [jobs]
            try:
                done[key] = tuple(self.fit(j) for j in jobs) if len(jobs) > 1 else self.fit(jobs[0])
            except Exception as e:  # noqa: BLE001 - raised in the tests that read this run
                done[key] = e

        def result(key):
            if isinstance(done[key], Exception):
                raise done[key]
            return done[key]

        return result

    def __exit__(self, *exc) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
