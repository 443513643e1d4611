"""GLUE-style multitask fine-tuning (`adaptune run multitask`, run.py): its settings (config.py), EDA (eda.py),
training and evaluation (training.py, metrics.py, distributed.py), per-dataset heads and parameter accounting
(heads.py), saved runs (runs.py) and its tables and plot (report.py)."""
