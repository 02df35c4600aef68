"""polcache_client: the robot side of the runtime (protocol, fixed-Hz loop, action schedule,
watchdog, adapter interface, the dashboard's metrics file). Depends only on numpy, pyzmq,
msgpack, msgspec and the standard library, never on torch, MuJoCo or the rest of polcache, so a
robot computer installs it alone: the `polcache-client` distribution built from client/
(`pip install ./client`)."""

from polcache_client.adapter import RobotAdapter
from polcache_client.connection import ConnectError, PolicyClient
from polcache_client.curve import KeyFolderError
from polcache_client.loop import ControlLoop
from polcache_client.metrics_file import MetricsFile, MetricsFileError
from polcache_client.protocol import PROTOCOL_VERSION, ProtocolError
from polcache_client.rate import Clock, MonotonicClock, Rate, use_realtime_priority
from polcache_client.records import ChunkRecord, TickRecord
from polcache_client.schedule import ActionSchedule
from polcache_client.watchdog import Watchdog

__all__ = [
    "PROTOCOL_VERSION",
    "ActionSchedule",
    "ChunkRecord",
    "Clock",
    "ConnectError",
    "ControlLoop",
    "KeyFolderError",
    "MetricsFile",
    "MetricsFileError",
    "MonotonicClock",
    "PolicyClient",
    "ProtocolError",
    "Rate",
    "RobotAdapter",
    "TickRecord",
    "Watchdog",
    "use_realtime_priority",
]
