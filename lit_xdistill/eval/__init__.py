"""Evaluation: offline lm-eval task suites, an lm-eval harness adapter and the Win-and-Tie metric.

``wintie`` (pure math + torchmetrics ``WinTieMetric``) and ``report`` (results files, tables, plots)
import no lm-eval; ``tasks`` renders the offline suite; ``harness`` runs lm-eval; ``commands`` holds the
``wintie`` and ``evaluate`` commands. lm-eval, datasets and matplotlib are imported inside functions.
"""

from lit_xdistill.eval.tasks import EvalSuite, SuiteTask, load_suite
from lit_xdistill.eval.wintie import (
    DEFAULT_ALPHAS,
    TaskComparison,
    WinTieMetric,
    WinTieReport,
    compare,
    coverage,
    critical_tolerance,
    win_or_tie,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "EvalSuite",
    "SuiteTask",
    "TaskComparison",
    "WinTieMetric",
    "WinTieReport",
    "compare",
    "coverage",
    "critical_tolerance",
    "load_suite",
    "win_or_tie",
]
