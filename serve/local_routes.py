"""Model routes inside the ingress replica (`serve.single_hop`).

By default each model route is a `BatchedModelServer` deployment of its own and the ingress calls
it through a Serve `DeploymentHandle`: the request is pickled, routed by Serve's router, sent as
an actor call and answered the same way back, which on 2 CPU cores costs about as much CPU per
request as the model's own share of a batched small-model call. With `single_hop` the ingress
replica builds the same `BatchedModelServer` class itself (same batching, hot swap, alias polling,
generation loop) and calls it in-process through `LocalRoute`, an object that answers the handle
calls the ingress makes (`.method.remote(...)`, `.options(stream=True)`, `cancel()`), so
`serve/ingress.py` routes, times out and translates errors the same way in both layouts.

What a deployment would have enforced, `LocalRoute` enforces: at most `max_ongoing_requests` calls
run in the model at once, at most `max_queued_requests` more wait (Serve's queue), beyond that
Serve's `BackPressureError` (the ingress answers 503 with its JSON body, as for a deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from ray.serve.exceptions import BackPressureError


class LocalRoute:
    """One model route served in this process, called like its deployment's handle."""

    def __init__(self, server: Any, max_ongoing_requests: int, max_queued_requests: int):
        self.server = server  # a BatchedModelServer instance (the deployment's class, not a deployment)
        self.max_queued = max_queued_requests  # -1: unlimited, as in Serve
        self._slots = asyncio.Semaphore(max_ongoing_requests)
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def _slot(self):
        """A place in the model (Serve's max_ongoing_requests), after a wait in its queue."""
        if self._slots.locked() and 0 <= self.max_queued <= self._waiting:
            raise BackPressureError(num_queued_requests=self._waiting, max_queued_requests=self.max_queued)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        async with self._slot():
            return await getattr(self.server, method)(*args, **kwargs)

    async def _stream(self, method: str, args: tuple, kwargs: dict) -> AsyncIterator[Any]:
        async with self._slot():
            async with contextlib.aclosing(getattr(self.server, method)(*args, **kwargs)) as items:
                async for item in items:
                    yield item

    def options(self, stream: bool = False, **_: Any) -> "LocalRoute | _StreamingView":
        return _StreamingView(self) if stream else self

    def __getattr__(self, method: str) -> "_Method":
        if method.startswith("_"):
            raise AttributeError(method)
        return _Method(lambda *a, **kw: asyncio.ensure_future(self._call(method, a, kw)))

    async def reconfigure(self, user_config: dict) -> None:
        await self.server.reconfigure(user_config)

    def check_health(self) -> None:
        self.server.check_health()


class _Method:
    """`handle.method`: `.remote(...)` starts the call and returns an awaitable that can be cancelled."""

    def __init__(self, start):
        self.remote = start


class _Stream:
    """What a streaming handle call returns: the items by `__anext__`, `cancel()` to stop early."""

    def __init__(self, items: AsyncIterator[Any]):
        self._items = items

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._items.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._items.aclose())


class _StreamingView:
    def __init__(self, route: LocalRoute):
        self._route = route

    def __getattr__(self, method: str) -> _Method:
        if method.startswith("_"):
            raise AttributeError(method)
        return _Method(lambda *a, **kw: _Stream(self._route._stream(method, a, kw)))


def local_routes(specs: dict[str, list[dict]]) -> dict[str, list[LocalRoute]]:
    """Model name -> its routes built in this process, in route order. Each spec holds the
    `BatchedModelServer` constructor's `args` and the route's `max_ongoing_requests` and
    `max_queued_requests` (what `serve.deploy` would have given its deployment)."""
    from serve.replica import BatchedModelServer

    server_class = BatchedModelServer.func_or_class  # the class under the deployment decorator
    return {model: [LocalRoute(server_class(*spec["args"], max_ongoing_requests=spec["max_ongoing_requests"]),
                               spec["max_ongoing_requests"], spec["max_queued_requests"])
                    for spec in routes]
            for model, routes in specs.items()}
