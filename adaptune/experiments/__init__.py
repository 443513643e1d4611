"""Evaluation runs ("experiments") of the papers, one folder (a wing) each: multitask/ (GLUE-style multitask
fine-tuning), vae/ (AdaVAE) and fewshot/ (transfer recipes under the few-shot protocol). common/ is the kit they
share; reports.py reads saved runs of any wing for `adaptune report`. The wings import common/ and never each
other; only reports.py imports every wing (.importlinter holds these rules).

Words kept apart: a *task* in adaptune's API is a named set of components; an *experiment* is an
evaluation run, and its *datasets* (SST, Quora, STS, ...) are described in common/datasets.py.
"""
