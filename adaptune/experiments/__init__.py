"""Evaluation runs ("experiments") of the papers: GLUE-style multitask fine-tuning (multitask.py).

Words kept apart: a *task* in adaptune's API is a named set of components; an *experiment* is an
evaluation run, and its *datasets* (SST, Quora, STS, ...) are described in datasets.py.
"""
