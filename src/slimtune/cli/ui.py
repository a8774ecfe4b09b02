"""`slimtune ui`: the web app, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import secrets
import sys

HELP = "a web UI: start, watch, compare and export fine-tunes in the browser"

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (7860)")
    parser.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder whose files the UI may read and write (repeatable; default: the current "
        "folder). New runs and uploads go under the first one",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SLIMTUNE_UI_TOKEN"),
        help="required of every request (default: $SLIMTUNE_UI_TOKEN; made up when listening "
        "beyond loopback)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from slimtune.ui import Allowed, create_app

    allowed = Allowed(args.allow or [os.getcwd()])
    loopback = args.host in LOOPBACK
    token = args.token or (None if loopback else secrets.token_urlsafe(24))
    app = create_app(allowed, token=token, loopback=loopback)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    folders = ", ".join(str(r) for r in allowed.roots)
    print(f"slimtune ui on {url}\nallowed folders: {folders}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
