"""Which device a model runs on: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` resolved once, with
the error a command exits 3 with when the device cannot be used here.

The public face of ``latentdiag._runtime``'s device functions (the implementation stays there, next to the
evaluation-mode helper the estimators share); import these names from outside the library (the CLI does).
"""

from latentdiag._runtime import DeviceError, resolve_device

__all__ = ["DeviceError", "resolve_device"]
