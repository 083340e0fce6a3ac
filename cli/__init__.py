"""The ``latentdiag`` command line (installed as ``latentdiag.cli``)."""
