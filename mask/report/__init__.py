"""Paper-style reports from MLflow runs: tables (Tables 3–6, 15), plots and the prototype map (Figure 3).

    from mask.report import make_report
    make_report(cfg, experiments=["mask-itm"], out_dir="reports/latest")

:mod:`mask.report.make` runs the report job, :mod:`mask.report.runs` reads the runs,
:mod:`mask.report.compose` builds the sections, :mod:`mask.report.plots` draws,
:mod:`mask.report.prototype_map` embeds the knowledge with t-SNE.
No Ray: the report reads MLflow and the knowledge artifacts only.
"""

from mask.report.make import default_out_dir, make_report
from mask.report.runs import ReportError

__all__ = ["ReportError", "make_report", "default_out_dir"]
