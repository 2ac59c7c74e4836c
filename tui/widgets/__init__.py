"""The viewer's widgets, one per module. They render values from :mod:`tui.viewvalues` and
never read a trace themselves (the step table asks its row loader, on a worker thread)."""

from .help import HelpScreen
from .notices import Notices
from .plots import Plots
from .prompt import Prompt
from .samples import SamplesPane
from .stepdetail import StepDetailPane
from .steptable import StepTable
from .tensors import TensorsPane

__all__ = ["HelpScreen", "Notices", "Plots", "Prompt", "SamplesPane", "StepDetailPane", "StepTable", "TensorsPane"]
