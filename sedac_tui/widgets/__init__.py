"""The SEDAC Chat panels: each a small widget that renders the view state the app builds from events."""

from .conversation import Conversation
from .entropy import EntropySparkline
from .heatmap import ExitHeatmap
from .help import HelpScreen
from .inspector import TokenInspector
from .o1 import O1List
from .state import ViewState
from .stats import ReplayBar, StatsBar

__all__ = [
    "Conversation",
    "EntropySparkline",
    "ExitHeatmap",
    "HelpScreen",
    "O1List",
    "ReplayBar",
    "StatsBar",
    "TokenInspector",
    "ViewState",
]
