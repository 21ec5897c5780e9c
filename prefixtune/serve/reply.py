"""One HTTP request's generations, from the backend's events to the client's answer.

A request asks for ``n`` choices of each of its prompts: each is one backend row
(:class:`~prefixtune.serve.batcher.Request`) whose sink, called on the batcher's thread, hands its
events to the event loop with ``call_soon_threadsafe``. :class:`Reply` gathers them into one answer
or streams them as server-sent events; a client that goes away cancels its rows.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request as HTTPRequest

from . import errors, responses
from .batcher import Event, Request
from .protocol import Job


class Reply:
    """The backend rows of one HTTP request (``n`` choices per prompt) and their events."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job, self.loop = job, loop
        self.id = responses.new_id(job.kind)
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = [
            Request(prompt, job.model, job.choice_params(c), sink=self._sink(p * job.n + c))
            for p, prompt in enumerate(job.prompts) for c in range(job.n)
        ]
        self.completion_tokens = [0] * len(self.requests)

    def _sink(self, index: int):
        def sink(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass
        return sink

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    def usage(self) -> dict:
        return responses.usage(sum(len(p) for p in self.job.prompts), sum(self.completion_tokens))

    def echo(self, index: int) -> str:
        return self.job.echo[index // self.job.n] if self.job.echo else ""

    async def events_until_done(self):
        """Yield ``(index, event)`` until every choice has finished; raise the first error."""
        pending = len(self.requests)
        while pending:
            index, event = await self.events.get()
            if event.error is not None:
                self.cancel()
                raise event.error
            if event.finish_reason is not None:
                pending -= 1
                self.completion_tokens[index] = event.completion_tokens
            yield index, event

    async def collect(self) -> tuple[list[str], list[str]]:
        texts = [self.echo(i) for i in range(len(self.requests))]
        reasons = [""] * len(self.requests)
        async for index, event in self.events_until_done():
            texts[index] += event.text
            if event.finish_reason:
                reasons[index] = event.finish_reason
        return texts, reasons

    def answer(self, texts: list[str], reasons: list[str]) -> dict:
        return responses.response(self.job, self.id, texts, reasons, self.usage())

    async def stream(self):
        """Server-sent events: OpenAI's chunks, then ``[DONE]``; an error ends the stream with an
        ``{"error": ...}`` event. A client that disconnects cancels its rows."""
        job = self.job
        try:
            for index in range(len(self.requests)):
                if job.kind == "chat":
                    yield _sse(responses.chunk(job, self.id, index, None, None, first=True))
                elif job.echo:
                    yield _sse(responses.chunk(job, self.id, index, self.echo(index), None))
            async for index, event in self.events_until_done():
                if event.text:
                    yield _sse(responses.chunk(job, self.id, index, event.text, None))
                if event.finish_reason:
                    yield _sse(responses.chunk(job, self.id, index, None, event.finish_reason))
            if job.include_usage:
                yield _sse(responses.usage_chunk(job, self.id, self.usage()))
            yield "data: [DONE]\n\n"
        except errors.APIError as err:
            yield _sse(err.body())
        finally:
            self.cancel()

    async def collect_unless_disconnected(self, request: HTTPRequest):
        """:meth:`collect`, or ``None`` if the client hangs up first: then its rows are cancelled at once
        (otherwise a dropped request would keep them until ``max_tokens``)."""
        collect = asyncio.ensure_future(self.collect())
        watch = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not collect.done():
                collect.cancel()
                self.cancel()
        if not collect.done() or collect.cancelled():
            return None
        return collect.result()


async def _disconnect(request: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
