"""polcache.dashboard: the runtime's metrics as a live local web page (`polcache dashboard`) and
as a static report of recorded runs (`polcache report`), both from the same views."""

from polcache.dashboard.report import write_report
from polcache.dashboard.server import Dashboard, run_dashboard
from polcache.dashboard.views import VIEWS, RunState

__all__ = ["VIEWS", "Dashboard", "RunState", "run_dashboard", "write_report"]
