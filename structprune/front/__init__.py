"""The front: the command line, run folders, model specs, saving and loading, plots and the
demo. The only package that imports both :mod:`structprune.accuracy` and
:mod:`structprune.deploy`.
"""
