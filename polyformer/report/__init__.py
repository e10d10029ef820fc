"""A run's own log files as one self-contained HTML page (`polyformer report RUN_DIR`), for readers without W&B.

- `runs`: finding the run under a directory and the `RunLogs` it is read into;
- `tensorboard_logs`, `csv_logs`, `wandb_logs`: one reader per logger's files;
- `summary`: which series share a plot, final and best values, throughput;
- `plots` (inline SVG curves) and `page` (the HTML).
"""

from polyformer.report.runs import RunLogs, choose_run, read_run

__all__ = ["RunLogs", "choose_run", "read_run"]
