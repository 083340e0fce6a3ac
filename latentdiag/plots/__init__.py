"""Plots of estimator results: each function takes a result object and returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state), so they work headless and in
threads; ``fig.savefig(path)`` writes them. matplotlib is imported only inside the plotting modules, so
``import latentdiag`` stays light.
"""
