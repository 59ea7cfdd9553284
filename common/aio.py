"""asyncio helpers shared by the service loops."""

from __future__ import annotations

import asyncio

__all__ = ["run_until_stopped"]


async def run_until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Run ``tasks`` until ``stop`` is set or one of them fails (its exception is re-raised);
    every task is cancelled and awaited before returning."""
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()
    finally:
        for task in (*tasks, waiter):
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
