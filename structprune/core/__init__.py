"""The pass: capture -> analyse -> score -> plan -> apply -> verify, with the op rules.

Imports nothing from :mod:`structprune.accuracy`, :mod:`structprune.deploy` or
:mod:`structprune.front`.
"""
