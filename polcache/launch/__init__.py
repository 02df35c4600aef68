"""`polcache launch`: start the policy server, the dashboard and a simulated robot together from
one config (configs/launch/*.yaml), pinned to CPUs, and stop them in a safe order."""

from polcache.launch.config import LaunchConfig, check_machine, load_launch_config
from polcache.launch.supervisor import run_launch

__all__ = ["LaunchConfig", "check_machine", "load_launch_config", "run_launch"]
