"""Online serving: ``AsyncLLM.generate(prompt, params)`` is an async iterator of a request's outputs.

One background thread drives the engine (schedule -> device step -> update) while the event loop stays free;
outputs reach each consumer through its own ``asyncio.Queue`` (``call_soon_threadsafe``). A lock guards the
scheduler: it is held to add, abort, schedule and update, never during device work. A request aborted while
its step is on the device loses its pages at once; the scheduler ignores its entry when the step completes.

Cancelling a consumer (``task.cancel()``, leaving the ``async for`` early, or ``abort(request_id)``) aborts
the request, so its pages go back to the pool immediately (a loop left with ``break`` aborts when the
generator is closed: wrap it in ``contextlib.aclosing`` to make that immediate). A bad request raises
``ValueError`` on the first iteration of ``generate``, before anything is queued; other requests keep running.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from .llm import LLM
from .request import SamplingParams
from .scheduler import RequestOutput


class AsyncLLM:
    def __init__(self, engine_or_model, *, idle_wait_s: float = 0.02, mesh=None, **llm_kwargs):
        """Wraps an ``LLM`` (or builds one from a model, ``mesh`` -- tensor parallelism, see ``LLM`` -- and
        ``llm_kwargs``)."""
        if isinstance(engine_or_model, LLM):
            if mesh is not None or llm_kwargs:
                raise ValueError("AsyncLLM(engine) takes the engine as built; pass mesh and other engine "
                                 f"options to LLM(...) instead (got {sorted(llm_kwargs) + ['mesh'] * bool(mesh)})")
            self.engine = engine_or_model
        else:
            self.engine = LLM(engine_or_model, mesh=mesh, **llm_kwargs)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._idle_wait_s = idle_wait_s
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the exception that stopped the engine thread, if any

    # ---- public -----------------------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                       priority: int = 2) -> AsyncIterator[RequestOutput]:
        """Yields one ``RequestOutput`` per sampled token; the last has ``finished=True``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.error is not None:
                raise RuntimeError("the engine thread has failed") from self.error
            rid = self.engine.add_request(prompt, params, request_id=request_id, priority=priority)  # ValueError
            self._queues[rid] = (loop, queue)
        self._ensure_thread()
        self._wake.set()
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(rid)
            with self._lock:
                self._queues.pop(rid, None)

    def abort(self, request_id: str) -> bool:
        """Cancels a request now (pages freed at once); its consumer gets a final output with reason 'abort'."""
        with self._lock:
            ok = self.engine.abort(request_id)
            if ok:
                c = self.engine.completions[request_id]
                self._deliver(request_id, RequestOutput(request_id=request_id, new_token_ids=(),
                                                        num_output_tokens=len(c.token_ids), finished=True,
                                                        finish_reason="abort"))
        return ok

    def stats(self):
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        """Stops the engine thread (unfinished requests stay queued in the engine)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # ---- engine thread ----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
            self._thread.start()

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass

    def _deliver_step(self, outputs) -> None:
        """One step's outputs: a single wake-up per consumer loop (not one per request), which hands each
        output to its queue on the loop's thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumers' loop is closed
                pass

    def _run(self) -> None:
        """schedule -> launch step N -> hand step N-1's outputs to the consumers -> wait for step N -> update.

        Outputs are handed over only once the next step is on the device, so the event loop streams them
        while the device works instead of competing for the GIL with the scheduling of the next step."""
        engine = self.engine
        pending: list = []  # outputs of the last finished step, not yet handed over
        while not self._stop:
            with self._lock:
                plan = inputs = None
                if engine.has_unfinished():
                    plan, inputs = engine.schedule()
            if plan is None:
                pending = self._hand_over(pending)
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            try:
                handle = engine.launch(plan, inputs)
                pending = self._hand_over(pending)
                sampled = engine.collect(handle)
            except BaseException as e:  # noqa: BLE001 - reported to every waiting consumer
                with self._lock:
                    self.error = e
                    for rid in list(self._queues):
                        self._deliver(rid, RuntimeError(f"engine step failed: {e!r}"))
                return
            with self._lock:
                pending = engine.finish_step(plan, sampled)
        self._hand_over(pending)

    def _hand_over(self, outputs) -> list:
        if outputs:
            with self._lock:
                self._deliver_step(outputs)
        return []


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)
