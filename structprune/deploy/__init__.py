"""Deployment after the pass: ONNX export, target runtimes, benchmarks, the latency model,
fast widths and speed targets.

Builds on :mod:`structprune.core`; never imports :mod:`structprune.accuracy` or
:mod:`structprune.front`.
"""
