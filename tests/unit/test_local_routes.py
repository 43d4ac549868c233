"""`serve.single_hop`: routes built inside the ingress answer the calls the ingress makes on a
deployment handle, with a deployment's limits (no Ray: a small async server stands in for
`BatchedModelServer`, whose batching the Serve tests check in the ingress); and the config
refuses what one ingress replica cannot hold."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError

from app.config.serve import AutoscalingSettings, ServeConfig, ServedModel
from serve.local_routes import LocalRoute


class SlowServer:
    """Answers after `release` is set; counts how many calls run at once."""

    def __init__(self):
        self.release = asyncio.Event()
        self.running = self.most = 0
        self.closed = 0

    async def info(self, tag: str = "") -> dict:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
            return {"tag": tag}
        finally:
            self.running -= 1

    async def generate_stream(self, n: int):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield [i]
        finally:
            self.closed += 1


def test_calls_past_max_ongoing_wait_and_past_the_queue_get_back_pressure():
    async def scenario():
        server = SlowServer()
        route = LocalRoute(server, max_ongoing_requests=2, max_queued_requests=1)
        calls = [route.info.remote(str(i)) for i in range(3)]  # 2 run, 1 waits
        await asyncio.sleep(0.01)
        assert (server.running, route._waiting) == (2, 1)
        with pytest.raises(BackPressureError):
            await route.info.remote("refused")
        server.release.set()
        assert [c["tag"] for c in await asyncio.gather(*calls)] == ["0", "1", "2"]
        assert server.most == 2
        late = await route.info.remote("after")  # the slots came back
        assert late == {"tag": "after"}

    asyncio.run(scenario())


def test_a_cancelled_call_gives_its_slot_back():
    async def scenario():
        server = SlowServer()
        route = LocalRoute(server, max_ongoing_requests=1, max_queued_requests=0)
        first = route.info.remote("slow")
        await asyncio.sleep(0.01)
        first.cancel()  # what the ingress does when request_timeout_s passes
        await asyncio.gather(first, return_exceptions=True)
        server.release.set()
        assert await route.info.remote("next") == {"tag": "next"}

    asyncio.run(scenario())


def test_streams_yield_every_item_and_close_the_generator_when_cancelled():
    async def scenario():
        server = SlowServer()
        route = LocalRoute(server, max_ongoing_requests=1, max_queued_requests=0)
        assert [item async for item in route.options(stream=True).generate_stream.remote(3)] == [[0], [1], [2]]
        stream = route.options(stream=True).generate_stream.remote(100)
        assert await stream.__anext__() == [0]
        with pytest.raises(BackPressureError):  # the open stream holds the one slot
            await route.info.remote("refused")
        stream.cancel()
        await asyncio.sleep(0.01)
        assert server.closed == 2
        server.release.set()
        assert await route.info.remote("freed") == {"tag": "freed"}

    asyncio.run(scenario())


def test_single_hop_needs_one_fixed_replica_count():
    ok = ServeConfig(single_hop=True, models=[ServedModel(model="a", num_replicas=2), ServedModel(model="b", num_replicas=2)])
    assert ok.single_hop
    with pytest.raises(ValidationError, match=r"serve.models\[1\].autoscaling"):
        ServeConfig(single_hop=True, models=[ServedModel(model="a"), ServedModel(model="b", autoscaling=AutoscalingSettings())])
    with pytest.raises(ValidationError, match=r"num_replicas.*\[1, 2\]"):
        ServeConfig(single_hop=True, models=[ServedModel(model="a"), ServedModel(model="b", num_replicas=2)])
