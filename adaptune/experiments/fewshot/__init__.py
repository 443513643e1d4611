"""Seed 003's transfer recipes as methods of the experiment runner: prompt-based learning (templates and
verbalizers, masked and causal LMs), the few-shot protocol (K examples per class, several seeds), self-ensemble
and self-distillation, and task-adaptive pretraining of the components (`adaptune run fewshot`, `adaptune tapt`)."""
