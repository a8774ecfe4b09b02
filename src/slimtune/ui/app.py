"""The UI's HTTP app: a JSON API over slimtune.ui's modules, and the static page that uses it.

Safety, since a browser can be made to call a local server by any web page it visits:
- every path is checked against the allowed folders (slimtune.ui.paths);
- with a token, every request needs it (header, or the cookie that `/?token=...` sets);
- requests that change something need the `X-Slimtune-UI` header, which a cross-site form or
  image cannot send (and a cross-site script cannot without a CORS pre-flight, never granted);
- on loopback, the Host header must name a loopback address (no DNS rebinding).
"""

from __future__ import annotations

import contextlib
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from slimtune.data.reading import SUFFIXES
from slimtune.errors import SlimtuneError
from slimtune.files import write_bytes
from slimtune.ui import exports, runs
from slimtune.ui.paths import Allowed, OutsideAllowed, safe_name
from slimtune.ui.plan import memory_plan
from slimtune.ui.playground import Playground
from slimtune.ui.preview import preview

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSRF_HEADER = "x-slimtune-ui"
COOKIE = "slimtune_ui_token"
UPLOADS = "uploads"
MAX_UPLOAD_BYTES = 1 << 30


class PathBody(BaseModel):
    path: str


class NewRun(BaseModel):
    name: str
    settings: dict[str, Any]


class PlaygroundBody(BaseModel):
    runs: list[str] = []
    messages: list[dict[str, str]]
    model: str | None = None
    include_base: bool = True
    max_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class ExportBody(BaseModel):
    path: str
    kind: str


def static_dir() -> Path:
    return Path(str(resources.files("slimtune.ui") / "static"))


def create_app(allowed: Allowed, *, token: str | None = None, loopback: bool = True) -> FastAPI:
    playground = Playground()

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        playground.close()  # the engine's thread; training runs are left running

    app = FastAPI(
        title="slimtune ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.playground = playground

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if loopback and _host(request) not in LOOPBACK_HOSTS:
            return JSONResponse({"error": "unexpected Host header"}, status_code=403)
        if token is not None and not _has_token(request, token):
            if request.url.path == "/" and request.query_params.get("token") is None:
                return Response("open the address slimtune ui printed (it carries the token)",
                                status_code=401)  # fmt: skip
            return JSONResponse({"error": "a valid token is required"}, status_code=401)
        if request.method != "GET" and request.headers.get(CSRF_HEADER) != "1":
            return JSONResponse({"error": f"missing {CSRF_HEADER} header"}, status_code=403)
        response = await call_next(request)
        if token is not None and request.query_params.get("token") == token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(SlimtuneError)
    async def _error(_, error: SlimtuneError):
        status = 403 if isinstance(error, OutsideAllowed) else 400
        return JSONResponse({"error": str(error)}, status_code=status)

    @app.get("/")
    def index():
        return FileResponse(static_dir() / "index.html")

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")

    # ---- what there is --------------------------------------------------------------------

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "allowed": [str(r) for r in allowed.roots],
            "defaults": runs.defaults(),
            "exports": exports.available(),
            "data_files": _files(allowed, lambda p: p.is_file() and p.suffix.lower() in SUFFIXES),
            "models": _files(
                allowed,
                lambda p: (
                    p.is_dir()
                    and (p / "config.json").is_file()
                    and not (p / "adapter_config.json").is_file()
                ),
            ),  # fmt: skip
        }

    @app.post("/api/upload")
    async def upload(request: Request, name: str) -> dict[str, Any]:
        safe_name(name, "file name")
        if Path(name).suffix.lower() not in SUFFIXES:
            raise SlimtuneError(f"{name}: expected one of {', '.join(sorted(SUFFIXES))}")
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise SlimtuneError(f"{name}: larger than {MAX_UPLOAD_BYTES >> 20} MiB")
        folder = allowed.resolve(allowed.home / UPLOADS)
        folder.mkdir(exist_ok=True)
        path = allowed.resolve(folder / name)
        write_bytes(path, body)
        return {"path": allowed.display(path)}

    @app.post("/api/preview")
    def data_preview(body: PathBody) -> dict[str, Any]:
        resolved = allowed.resolve(body.path)
        return {"path": allowed.display(resolved), **preview(resolved)}

    @app.post("/api/plan")
    def plan(settings: dict[str, Any]) -> dict[str, Any]:
        model = settings.get("model")
        return memory_plan(settings, allowed.resolve(model) if model else None)

    # ---- runs -----------------------------------------------------------------------------

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        out = []
        for folder in runs.find_runs(allowed):
            state = runs.status(folder)
            state.pop("losses"), state.pop("evals")
            out.append({"path": allowed.display(folder), "name": folder.name, **state})
        return out

    @app.post("/api/runs")
    def new_run(body: NewRun) -> dict[str, Any]:
        folder = runs.start_run(allowed, body.name, body.settings)
        return {"path": allowed.display(folder)}

    @app.get("/api/run")
    def run_status(path: str) -> dict[str, Any]:
        folder = _run(allowed, path)
        return {"path": allowed.display(folder), "name": folder.name, **runs.status(folder)}

    @app.post("/api/run/stop")
    def stop(body: PathBody) -> dict[str, Any]:
        return {"stopped": runs.stop_run(_run(allowed, body.path))}

    @app.post("/api/run/resume")
    def resume(body: PathBody) -> dict[str, Any]:
        runs.resume_run(allowed, _run(allowed, body.path))
        return {"resumed": True}

    # ---- playground -----------------------------------------------------------------------

    @app.post("/api/playground")
    def answer(body: PlaygroundBody) -> dict[str, Any]:
        folders = [_run(allowed, p) for p in body.runs]
        configs = [runs.read_config(f) for f in folders]
        bases = {c.get("model") for c in configs} | ({body.model} if body.model else set())
        if len(bases) > 1:
            raise SlimtuneError(f"the adapters were trained on different base models: {bases}")
        base = bases.pop() if bases else None
        if base is not None:
            base = str(allowed.resolve(base))
        qlora = bool(configs) and all(c.get("method") == "qlora" for c in configs)
        columns = playground.answer(
            model=base,
            qlora=qlora,
            adapters=folders,
            messages=[
                {"role": m.get("role", "user"), "content": m.get("content", "")}
                for m in body.messages
            ],  # fmt: skip
            include_base=body.include_base,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
        )
        return {"model": base or "default", "qlora": qlora, "answers": columns}

    # ---- export ---------------------------------------------------------------------------

    @app.get("/api/export")
    def export_status(path: str) -> dict[str, Any]:
        return exports.export_status(_run(allowed, path))

    @app.post("/api/export")
    def export(body: ExportBody) -> dict[str, Any]:
        folder = _run(allowed, body.path)
        if body.kind == exports.SURVIVAL:
            exports.start_survival(folder, allowed.home)
        else:
            exports.start_export(folder, body.kind, allowed.home)
        return {"started": body.kind}

    return app


def _run(allowed: Allowed, path: str) -> Path:
    folder = allowed.resolve(path)
    if not runs.is_run(folder):
        raise SlimtuneError(f"{path}: not a run folder")
    return folder


def _files(allowed: Allowed, keep, depth: int = 3, limit: int = 200) -> list[str]:
    """Paths under the allowed folders that `keep` accepts (hidden folders and runs skipped)."""
    found: list[str] = []

    def walk(folder: Path, left: int) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        for child in children:
            if len(found) >= limit or child.name.startswith(".") or child.is_symlink():
                continue
            if keep(child):
                found.append(allowed.display(child))
            elif child.is_dir() and left > 0 and child.name not in {"checkpoints", "node_modules"}:
                walk(child, left - 1)

    for root in allowed.roots:
        walk(root, depth)
    return found


def _host(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def _has_token(request: Request, token: str) -> bool:
    given = (
        request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        or request.cookies.get(COOKIE)
        or request.query_params.get("token")
        or ""
    )
    return secrets.compare_digest(given.encode(), token.encode())
