"""Accuracy around the pass: data, recovery without training, training and distillation,
sparsity, sensitivity, evaluation and distributed runs.

Builds on :mod:`structprune.core`; never imports :mod:`structprune.deploy` or
:mod:`structprune.front`.
"""
