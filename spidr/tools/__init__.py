"""Training tools with the reference release's names: logging setup, running averages, the validation metrics
queue, the profiler and the git state of a launch.

``init_logger`` configures the root logger; :class:`AverageMeters` keeps running averages on the device;
:class:`MetricsQueue` yields the validation results of separate jobs in step order; :func:`profiler_context`
profiles a few training steps; :func:`write_git_info_if_available` records the code's git state.
"""

from spidr.tools.git import write_git_info_if_available
from spidr.tools.logger import init_logger
from spidr.tools.meters import AverageMeters
from spidr.tools.metrics_queue import MetricsQueue
from spidr.tools.profiler import profiler_context

__all__ = ["AverageMeters", "MetricsQueue", "init_logger", "profiler_context", "write_git_info_if_available"]
