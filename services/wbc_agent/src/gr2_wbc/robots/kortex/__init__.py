"""The real Kinova Gen3 through Kinova's ``kortex_api`` (low-level servoing over UDP).

Importing this package does not import ``kortex_api`` (not on PyPI); it is loaded when a
:class:`~gr2_wbc.robots.kortex.backend.KortexBackend` is built without an injected ``kortex``
namespace. :mod:`gr2_wbc.robots.kortex.fake` holds the stand-in used by the tests.
"""

from gr2_wbc.robots.kortex.backend import (
    KortexApi,
    KortexBackend,
    KortexUnavailableError,
    load_kortex_api,
)

__all__ = ["KortexApi", "KortexBackend", "KortexUnavailableError", "load_kortex_api"]
