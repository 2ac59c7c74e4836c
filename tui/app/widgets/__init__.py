"""The viewer's widgets, one per module. They render values from :mod:`steptrace.tui.viewer.values` and
never read a trace themselves (the step table asks its row loader, on a worker thread)."""

from steptrace.tui.app.widgets.help import HelpScreen
from steptrace.tui.app.widgets.notices import Notices
from steptrace.tui.app.widgets.plots import Plots
from steptrace.tui.app.widgets.prompt import Prompt
from steptrace.tui.app.widgets.samples import SamplesPane
from steptrace.tui.app.widgets.stepdetail import StepDetailPane
from steptrace.tui.app.widgets.steptable import StepTable
from steptrace.tui.app.widgets.tensors import TensorsPane

__all__ = ["HelpScreen", "Notices", "Plots", "Prompt", "SamplesPane", "StepDetailPane", "StepTable", "TensorsPane"]
