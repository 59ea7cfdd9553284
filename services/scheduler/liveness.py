"""Socket-level failure detection on the backend ROUTER: which worker's connection just closed.

Heartbeats alone take the whole heartbeat timeout to notice a dead worker. ZeroMQ's socket monitor
reports a peer's connection closing at once (ipc://: the kernel closes the socket when the process
dies; tcp://: when the peer's host answers with a reset). Monitor events name a file descriptor,
not the peer's routing id, so this module maps them back to a process:

- ipc://: on ACCEPTED the scheduler asks the kernel who is on the other end (SO_PEERCRED gives
  the peer's pid) and remembers fd -> pid; workers put their pid in Register. On DISCONNECTED the
  pid says which worker it was, and `/proc` says whether that process is gone: that is a definite
  death (the worker is declared dead at once). A process still there (it is closing, or only the
  connection dropped) is only suspect.
- anything else (tcp://, or a pid the kernel would not give): the disconnect is not attributable,
  so every instance that has not heartbeated since is suspect: no new work, and death still needs
  the heartbeat timeout. A healthy worker is never killed on a false positive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from services.scheduler.registry import Instance, Registry

__all__ = ["PeerMonitor", "judge_disconnect", "process_gone", "peer_pid"]

logger = logging.getLogger(__name__)

# (pid or None when unknown) -> coroutine run for each closed peer connection.
OnDisconnect = Callable[[int | None], Awaitable[None]]

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


def peer_pid(fd: int) -> int | None:
    """The pid on the other end of a unix socket `fd` (None: not a unix socket, or unknown)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        return pid if pid > 0 else None
    except OSError:
        return None
    finally:
        sock.close()  # closes the dup only


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def judge_disconnect(registry: Registry, pid: int | None) -> Instance | None:
    """What a closed backend connection means: the instance it was, declared dead (and removed)
    when its process is gone; otherwise it or everyone silent becomes suspect, and None."""
    instance = registry.by_pid(pid) if pid is not None else None
    if instance is None or pid is None:
        registry.note_unattributed_disconnect()
        return None
    for _ in range(5):  # the kernel closes a killed process's sockets just before it exits
        if process_gone(pid):
            return instance if registry.kill(instance, "its process exited") else None
        await asyncio.sleep(0.1)
    if registry.mark_suspect(instance, "its connection closed"):
        logger.warning("instance %s is suspect (its connection closed): no new work", instance.instance_id)
    return None


class PeerMonitor:
    """Watches a bound ROUTER's connections and reports each one that closes."""

    def __init__(self, sock: zmq.asyncio.Socket, on_disconnect: OnDisconnect) -> None:
        self.on_disconnect = on_disconnect
        self._monitor = sock.get_monitor_socket(_EVENTS)
        self._sock = sock
        self._pids: dict[int, int] = {}  # fd -> peer pid (ipc peers only)
        self.disconnects = 0

    async def run(self) -> None:
        while True:
            try:
                frames = await self._monitor.recv_multipart()
                event = parse_monitor_message(frames)
            except zmq.ZMQError:
                if self._monitor.closed:
                    return
                await asyncio.sleep(0.1)
                continue
            except Exception:  # a malformed event must not stop the monitor
                logger.exception("bad monitor event")
                continue
            fd = event.get("value")
            if event["event"] == zmq.EVENT_ACCEPTED and isinstance(fd, int):
                pid = peer_pid(fd)
                if pid is not None:
                    self._pids[fd] = pid
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                pid = self._pids.pop(fd, None) if isinstance(fd, int) else None
                try:
                    await self.on_disconnect(pid)
                except Exception:
                    logger.exception("disconnect handler failed")

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
