"""slimtune ui's API without a browser: the allowed folders, the token and request checks, the
data preview, the memory plan, and a run's progress read from the files a run writes."""

import json
import subprocess
import sys

import psutil
import pytest
from fastapi.testclient import TestClient
from helpers import write_jsonl

from slimtune.errors import SlimtuneError
from slimtune.ui import Allowed, OutsideAllowed, create_app
from slimtune.ui import runs as ui_runs

POST = {"X-Slimtune-UI": "1"}


def client(root, **kwargs) -> TestClient:
    return TestClient(create_app(Allowed([root]), **kwargs), base_url="http://127.0.0.1")


# ------------------------------------------------------------------------------ allowed folders


def test_paths_outside_the_allowed_folders_are_refused(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    secret = write_jsonl(tmp_path / "secret.jsonl", [{"text": "secret"}])
    (root / "link.jsonl").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path)
    write_jsonl(root / "ok.jsonl", [{"text": "fine"}])
    allowed = Allowed([root])
    assert allowed.resolve("ok.jsonl") == root / "ok.jsonl"
    assert allowed.resolve(str(root / "sub" / ".." / "ok.jsonl")) == root / "ok.jsonl"
    for bad in ["../secret.jsonl", str(secret), "link.jsonl", "linkdir/secret.jsonl", "/etc/passwd",
                "sub/../../secret.jsonl", "~/x", "ok.jsonl\x00"]:  # fmt: skip
        with pytest.raises(OutsideAllowed):
            allowed.resolve(bad)

    api = client(root)
    assert api.post("/api/preview", json={"path": "ok.jsonl"}, headers=POST).status_code == 200
    for bad in ["../secret.jsonl", str(secret), "link.jsonl", "linkdir/secret.jsonl"]:
        response = api.post("/api/preview", json={"path": bad}, headers=POST)
        assert response.status_code == 403, bad
        assert "secret" not in json.dumps(response.json().get("rows", ""))
    assert api.get("/api/run", params={"path": "../"}).status_code == 403
    assert api.post("/api/plan", json={"model": str(tmp_path)}, headers=POST).status_code == 403
    settings = {"data": "../secret.jsonl"}
    response = api.post("/api/runs", json={"name": "r", "settings": settings}, headers=POST)
    assert response.status_code == 403
    assert not (root / "runs" / "r").exists()


def test_uploads_land_in_the_allowed_folder_under_a_plain_name(tmp_path):
    api = client(tmp_path)
    body = b'{"text": "hello"}\n'
    response = api.post("/api/upload", params={"name": "mine.jsonl"}, content=body, headers=POST)
    assert response.json() == {"path": "uploads/mine.jsonl"}
    assert (tmp_path / "uploads" / "mine.jsonl").read_bytes() == body
    for name in ["../evil.jsonl", "a/b.jsonl", ".hidden.jsonl", "x.sh"]:
        response = api.post("/api/upload", params={"name": name}, content=body, headers=POST)
        assert response.status_code == 400, name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mine.jsonl"]


def test_allowed_folders_must_exist(tmp_path):
    with pytest.raises(SlimtuneError, match="not a folder"):
        Allowed([tmp_path / "missing"])


# ------------------------------------------------------------------------------ request checks


def test_token_host_and_header_checks(tmp_path):
    open_api = client(tmp_path)
    assert open_api.get("/api/info").status_code == 200
    # A page elsewhere cannot post a form here (no custom header), nor reach us by a rebound name.
    assert open_api.post("/api/preview", json={"path": "x"}).status_code == 403
    assert open_api.get("/api/info", headers={"Host": "evil.example:7860"}).status_code == 403

    api = client(tmp_path, token="s3cret", loopback=False)
    assert api.get("/api/info", headers={"Host": "10.0.0.5:7860"}).status_code == 401
    assert api.get("/api/info", params={"token": "wrong"}).status_code == 401
    assert api.get("/", headers={"Host": "10.0.0.5"}).status_code == 401
    assert api.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    page = api.get("/", params={"token": "s3cret"})  # the address `slimtune ui` prints
    assert page.status_code == 200 and "slimtune" in page.text
    assert api.get("/api/info").status_code == 200  # the cookie it set carries the token on


def test_cli_makes_up_a_token_beyond_loopback(tmp_path, monkeypatch, capsys):
    import uvicorn

    from slimtune.cli import main

    seen = {}
    monkeypatch.setattr(
        uvicorn, "run", lambda app, host, port, **_: seen.update(app=app, host=host)
    )
    monkeypatch.delenv("SLIMTUNE_UI_TOKEN", raising=False)
    assert main(["ui", "--host", "0.0.0.0", "--port", "9", "--allow", str(tmp_path)]) == 0
    printed = capsys.readouterr().err
    token = printed.split("?token=")[1].split()[0]
    assert len(token) >= 20
    api = TestClient(seen["app"], base_url="http://10.1.2.3")
    assert api.get("/api/info").status_code == 401
    assert api.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert main(["ui", "--allow", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------ new run


def test_preview_names_the_format_and_each_bad_row_with_its_line(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(7)]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json", "", json.dumps({"foo": 1})]
    path.write_text("\n".join(lines + [json.dumps(r) for r in rows[3:]]) + "\n")
    result = client(tmp_path).post("/api/preview", json={"path": "data.jsonl"}, headers=POST).json()
    assert result["format"] == "completion"
    assert result["count"] == 8 and len(result["rows"]) == 5
    assert result["rows"][0]["row"] == rows[0]
    assert [b["where"] for b in result["bad"]] == [f"{path}, line 4", f"{path}, line 6"]
    assert "invalid JSON" in result["bad"][0]["error"]
    assert "cannot tell the format" in result["bad"][1]["error"]
    assert result["bad_count"] == 2 and not result["ok"]

    (tmp_path / "notes.txt").write_text("x")
    result = client(tmp_path).post("/api/preview", json={"path": "notes.txt"}, headers=POST).json()
    assert "unknown data file type" in result["error"]


def test_memory_plan_is_the_planners_and_follows_the_settings(tmp_path):
    from slimtune.memory import builtin_architecture, estimate
    from slimtune.train import TrainConfig
    from slimtune.ui.plan import _auto_dtype

    api = client(tmp_path)
    small = api.post("/api/plan", json={"method": "qlora", "rank": 8}, headers=POST).json()
    big = api.post("/api/plan", json={"method": "qlora", "rank": 64}, headers=POST).json()
    arch = builtin_architecture("smollm2-135m")
    auto = _auto_dtype()  # the form's compute_dtype is auto: as `slimtune train` resolves it here
    for plan, rank in ((small, 8), (big, 64)):
        config = TrainConfig(method="qlora", rank=rank)
        assert plan["total_bytes"] == estimate(arch, config, "cpu", auto).total
    assert big["total_bytes"] > small["total_bytes"]
    assert small["memory_bytes"] > 0 and small["fits"] == (
        small["total_bytes"] <= small["available_bytes"]
    )
    bad = api.post("/api/plan", json={"method": "qlora", "rank": 0}, headers=POST)
    assert bad.status_code == 400 and "rank" in bad.json()["error"]


def test_a_bad_setting_is_refused_before_anything_starts(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    api = client(tmp_path)
    body = {"name": "r", "settings": {"data": "d.jsonl", "rank": -1}}
    response = api.post("/api/runs", json=body, headers=POST)
    assert response.status_code == 400 and "rank" in response.json()["error"]
    body = {"name": "../r", "settings": {"data": "d.jsonl"}}
    assert api.post("/api/runs", json=body, headers=POST).status_code == 400
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ runs


def fake_run(folder, records, log="", config=None, job=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps(config or {"epochs": 2, "max_steps": None}))
    write_jsonl(folder / "metrics.jsonl", records)
    (folder / "train.log").write_text(log)
    if job is not None:
        (folder / "ui-job.json").write_text(json.dumps(job))


def test_progress_is_read_from_metrics_and_the_progress_line(tmp_path):
    records = [
        {"step": s, "epoch": s / 5, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 100.0 + s}
        for s in range(1, 4)
    ]
    records.append({"step": 3, "epoch": 0.6, "eval_loss": 2.5, "eval_perplexity": 12.2,
                    "eval_accuracy": 0.25})  # fmt: skip
    # A running job (a sleeping stand-in named like one) with tqdm's last line in its log.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "slimtune"])
    job = {"pid": child.pid, "started": psutil.Process(child.pid).create_time()}
    log = "training:  30%|###  | 3/10 [00:03<01:05,  1.00step/s, loss=2.7]\r"
    fake_run(tmp_path / "runs" / "a", records, log, job=job)
    with open(tmp_path / "runs" / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line being written
    try:
        status = client(tmp_path).get("/api/run", params={"path": "runs/a"}).json()
    finally:
        child.kill()
        child.wait()
    assert status["state"] == "running"
    assert status["step"] == 3 and status["total_steps"] == 10
    assert status["loss"] == pytest.approx(2.7) and status["tokens_per_s"] == 103.0
    assert status["losses"] == [[1, 2.9], [2, 2.8], [3, 2.7]]
    assert status["evals"][0]["eval_accuracy"] == 0.25
    assert status["eta_s"] == 65
    assert ui_runs.status(tmp_path / "runs" / "a")["state"] == "stopped"  # gone, no exit code

    # Without a progress line: total steps from the epoch fraction (5 steps an epoch, 2 epochs).
    fake_run(tmp_path / "runs" / "b", records[:2])
    status = ui_runs.status(tmp_path / "runs" / "b")
    assert status["total_steps"] == 10 and status["state"] == "incomplete"

    listed = client(tmp_path).get("/api/runs").json()
    assert sorted(r["name"] for r in listed) == ["a", "b"]


def test_a_crashed_run_says_why_and_resumes_only_from_a_checkpoint(tmp_path):
    records = [{"step": 1, "epoch": 0.1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1.0}]
    log = "training:  10%| | 1/10 [00:01<00:09]\rTraceback...\nRuntimeError: out of memory\n"
    job = {"pid": 1, "started": 0, "returncode": 1, "argv": []}
    fake_run(tmp_path / "runs" / "c", records, log, job=job)
    api = client(tmp_path)
    status = api.get("/api/run", params={"path": "runs/c"}).json()
    assert status["state"] == "failed" and "out of memory" in status["error"]
    assert not status["can_resume"]
    response = api.post("/api/run/resume", json={"path": "runs/c"}, headers=POST)
    assert response.status_code == 400 and "no checkpoint" in response.json()["error"]
    (tmp_path / "runs" / "c" / "checkpoints" / "step-000001").mkdir(parents=True)
    assert api.get("/api/run", params={"path": "runs/c"}).json()["can_resume"]


def test_playground_and_export_refuse_what_they_cannot_do(tmp_path):
    for name, model in [("a", "m1"), ("b", "m2")]:
        fake_run(tmp_path / "runs" / name, [], config={"model": str(tmp_path / model)})
    api = client(tmp_path)
    body = {"runs": ["runs/a", "runs/b"], "messages": [{"role": "user", "content": "hi"}]}
    response = api.post("/api/playground", json=body, headers=POST)
    assert response.status_code == 400 and "different base models" in response.json()["error"]
    body = {"runs": ["runs/a"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}
    assert api.post("/api/playground", json=body, headers=POST).status_code == 422
    response = api.post("/api/export", json={"path": "runs/a", "kind": "merged"}, headers=POST)
    assert response.status_code == 400 and "no adapter yet" in response.json()["error"]
    response = api.post("/api/export", json={"path": "runs/a", "kind": "exe"}, headers=POST)
    assert response.status_code == 400 and "unknown export" in response.json()["error"]
    status = api.get("/api/export", params={"path": "runs/a"}).json()
    assert {item["state"] for item in status.values()} == {"none"}


def test_the_gain_kept_is_read_from_the_end_of_the_survival_log(tmp_path):
    from slimtune.ui.exports import _json_at_end

    result = {"accuracy": {"base fp32": 0.1, "base + adapter": 0.9}, "gain_kept": {"x": 1.0}}
    log = tmp_path / "export-survival.log"
    log.write_text("Loading weights: 100%\n{not this}\n" + json.dumps(result, indent=2) + "\n")
    assert _json_at_end(log) == result
    log.write_text("Traceback ...\n")
    assert _json_at_end(log) is None


def test_a_new_run_is_its_config_and_a_slimtune_train_process(tmp_path, monkeypatch):
    import yaml

    from slimtune.ui import jobs

    started = []
    monkeypatch.setattr(jobs, "start", lambda command, record, log, cwd, **_: started.append(
        (command, record, log, cwd)))  # fmt: skip
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    settings = {"data": "d.jsonl", "rank": 8, "targets": "q_proj, v_proj", "max_steps": None}
    api = client(tmp_path)
    response = api.post("/api/runs", json={"name": "r1", "settings": settings}, headers=POST)
    assert response.json() == {"path": "runs/r1"}
    folder = tmp_path / "runs" / "r1"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["rank"] == 8 and config["targets"] == ["q_proj", "v_proj"]
    assert config["data"] == str(tmp_path / "d.jsonl") and config["output"] == str(folder)
    assert started == [(["slimtune", "train", str(folder / "config.yaml")],
                        folder / "ui-job.json", folder / "train.log", tmp_path)]  # fmt: skip
    again = api.post("/api/runs", json={"name": "r1", "settings": settings}, headers=POST)
    assert again.status_code == 400 and "exists already" in again.json()["error"]


def test_gguf_is_offered_only_where_slimtune_can_write_it(tmp_path, monkeypatch):
    import importlib.util

    from slimtune.ui import exports

    has_writer = importlib.util.find_spec(exports.GGUF_COMMAND) is not None
    info = client(tmp_path).get("/api/info").json()["exports"]
    assert info["gguf"] == has_writer and ("gguf" in info["kinds"]) == has_writer
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == exports.GGUF_COMMAND else real(name, *a))  # fmt: skip
    fake_run(tmp_path / "runs" / "a", [], config={})
    (tmp_path / "runs" / "a" / "adapter_config.json").write_text("{}")
    response = client(tmp_path).post(
        "/api/export", json={"path": "runs/a", "kind": "gguf"}, headers=POST
    )
    assert response.status_code == 400 and "unknown export 'gguf'" in response.json()["error"]
