"""`slimtune ui`: a local web app to start, watch, compare and export fine-tunes.

A FastAPI app (slimtune.ui.app) over small modules: the allowed folders (paths), training and
export processes (jobs, runs, exports), the data preview, the memory plan, and the playground on
`slimtune serve`'s engine. The page itself is plain HTML/JS/CSS in `static/`, nothing from a CDN.
"""

from slimtune.ui.paths import Allowed, OutsideAllowed


def create_app(*args, **kwargs):
    """`slimtune.ui.app.create_app`, imported on use (it imports FastAPI)."""
    from slimtune.ui.app import create_app as create

    return create(*args, **kwargs)


__all__ = ["Allowed", "OutsideAllowed", "create_app"]
