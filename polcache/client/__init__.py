"""polcache.client: the robot side of the runtime (protocol, fixed-Hz loop, action schedule,
watchdog, adapter interface). Depends only on numpy, pyzmq, msgpack and the standard library,
never on torch, MuJoCo or the rest of polcache, so a robot computer can install it alone."""

from polcache.client.adapter import RobotAdapter
from polcache.client.connection import ConnectError, PolicyClient
from polcache.client.loop import ControlLoop
from polcache.client.protocol import PROTOCOL_VERSION, ProtocolError
from polcache.client.rate import Clock, MonotonicClock, Rate, use_realtime_priority
from polcache.client.records import ChunkRecord, TickRecord
from polcache.client.schedule import ActionSchedule
from polcache.client.watchdog import Watchdog

__all__ = [
    "PROTOCOL_VERSION",
    "ActionSchedule",
    "ChunkRecord",
    "Clock",
    "ConnectError",
    "ControlLoop",
    "MonotonicClock",
    "PolicyClient",
    "ProtocolError",
    "Rate",
    "RobotAdapter",
    "TickRecord",
    "Watchdog",
    "use_realtime_priority",
]
