"""The running parts a user starts on a machine or a cluster, started for real.

- `kdarena dashboard` listens on 127.0.0.1 only unless `--host` says otherwise
  (checked on the listening socket itself, in /proc/net/tcp, and by
  connecting through the machine's other addresses).
- The dashboard renders every page from a store it may only read: a
  write-protected copy of a real sweep's database whose bytes, mtime and
  journal files stay as they were, and the same copy on a read-only mount
  (where a write is impossible, even as root).
- An MLflow server with basic authentication (`mlflow server --app-name
  basic-auth`): it refuses anonymous requests; `kdarena train` records a run
  with a user's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; wrong or
  missing credentials end in one clear message and exit code 2, before
  anything is trained or written; so does a user who may only read the
  experiment (HTTP 403), for `kdarena train` and `kdarena sweep`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import kdarena.dashboard
from kdarena.leaderboards import runs as lb_runs
from kdarena.cli.app import app as cli

from helpers import wait_http

APP = str(Path(kdarena.dashboard.__file__).with_name("app.py"))
TIMEOUT = 120  # the first page of a session imports MLflow and plotly
FAST = ["--set", "teacher.recipe.epochs=2", "--set", "train.epochs=2"]  # digits, kd, CNN -> CNN: seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM (to its own process group when it has one), then SIGKILL after 15 s."""
    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    if group:  # the workers of a server outlive their parent unless told to
        send(signal.SIGKILL)


# -- (a) the dashboard binds 127.0.0.1 unless told otherwise -----------------------------------------------------
def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket in LISTEN state on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A = TCP_LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host byte order
            packed = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(packed)))
    return found


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses outside 127.0.0.0/8 (from `ip`, else the hostname's), maybe none."""
    addrs = set()
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
        for iface in json.loads(out.stdout or "[]"):
            addrs |= {a["local"] for a in iface.get("addr_info", []) if a.get("family") == "inet"}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        try:
            addrs |= set(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback)


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_dashboard_listens_on_loopback_only_unless_host_says_otherwise(tmp_path: Path):
    """Two real `kdarena dashboard` processes, default and `--host 0.0.0.0`, started side by side."""
    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"  # no store yet: the empty state, nothing created
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    started = []
    for extra in ([], ["--host", "0.0.0.0"]):
        port = _free_port()
        log = tmp_path / f"dashboard-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kdarena.cli", "dashboard", "--port", str(port),
                                     "--tracking-uri", uri, *extra],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        started.append((port, proc, log))
    try:
        for port, proc, log in started:
            wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc, log, "kdarena dashboard")
        (local_port, _, _), (open_port, _, _) = started
        others = _other_addresses()

        assert _listening(local_port) == {"127.0.0.1"}
        assert _connects("127.0.0.1", local_port)
        for addr in others:  # the machine's own network address reaches nothing on the default
            assert not _connects(addr, local_port), addr

        assert _listening(open_port) == {"0.0.0.0"}
        assert _connects("127.0.0.1", open_port)
        for addr in others:
            assert _connects(addr, open_port), addr
    finally:
        for _, proc, _ in started:
            _stop(proc)
    assert not (tmp_path / "none").exists()


# -- (b) the dashboard reads a store it may only read ------------------------------------------------------------
def _state(db: Path) -> dict:
    """The store file's bytes and mtime, and every file beside it (journals, WAL, shared memory)."""
    st = db.stat()
    return {"sha256": hashlib.sha256(db.read_bytes()).hexdigest(), "mtime_ns": st.st_mtime_ns, "size": st.st_size,
            "mode": oct(st.st_mode & 0o777), "folder": sorted(p.name for p in db.parent.iterdir())}


def _read_only_copy(swept_store: dict, folder: Path) -> Path:
    folder.mkdir()
    db = folder / "mlflow.db"
    shutil.copy2(swept_store["work"] / "mlflow.db", db)
    db.chmod(0o444)
    return db


def _ok(at: AppTest, where: str) -> None:
    assert not at.exception, (where, [e.value for e in at.exception])
    assert not at.error, (where, [e.value for e in at.error])


def _render_every_page(uri: str, monkeypatch: pytest.MonkeyPatch, every_run: bool = True) -> int:
    """Leaderboard, Sweeps (every sweep method), Run (one run of each role and status, or only the first);
    returns how many runs were shown."""
    monkeypatch.setenv("KDARENA_TRACKING_URI", uri)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    _ok(at, "leaderboard")
    assert at.title[0].value == "Leaderboard" and len(at.dataframe[0].value) > 0
    at.switch_page("views/sweeps.py").run()
    _ok(at, "sweeps")
    for method in at.selectbox(key="sw_method").options:
        at.selectbox(key="sw_method").set_value(method).run()
        _ok(at, f"sweeps {method}")
    runs = lb_runs.load_runs(uri)
    shown = runs.drop_duplicates(["role", "status"]) if every_run else runs.head(1)
    for run_id in shown["run_id"]:
        at.query_params["run"] = run_id
        at.switch_page("views/run.py").run()
        _ok(at, f"run {run_id}")
        assert at.query_params["run"] == run_id
        assert any(c.language == "yaml" for c in at.code), "the run's config.yaml"
    return len(shown)


def test_dashboard_renders_every_page_from_a_write_protected_store(swept_store: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """A chmod 0444 copy: every page renders, and the file and its folder are byte for byte as before.

    Tests may run as root, where permission bits stop no write, so the proof
    is the file's sha256, mtime and the absence of any -journal / -wal /
    -shm file after the last page; the read-only mount below covers root.
    """
    db = _read_only_copy(swept_store, tmp_path / "store")
    before = _state(db)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # the copy is a whole, readable MLflow store
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    shown = _render_every_page(f"sqlite:///{db}", monkeypatch)
    assert shown >= 4  # trial (completed, early-stopped, diverged), final, train
    assert _state(db) == before
    assert before["folder"] == ["mlflow.db"] and before["mode"] == "0o444"


def _mount_read_only(folder: Path) -> str | None:
    """Bind-mount `folder` read-only onto itself; None when done, else why it could not be (not root, no mount)."""
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exc}: {getattr(exc, 'stderr', b'') or b''!r}"
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        subprocess.run(["umount", "--lazy", str(folder)], check=False, capture_output=True, timeout=30)
        return f"{exc}: {getattr(exc, 'stderr', b'') or b''!r}"
    return None


def test_dashboard_renders_from_a_read_only_mount(swept_store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """On a read-only file system no write can succeed, even as root: the pages still render, from the first run."""
    db = _read_only_copy(swept_store, tmp_path / "ro")
    why = _mount_read_only(db.parent)
    if why is not None:
        pytest.skip(f"no read-only bind mount here (needs root and mount(8): {why}); "
                    "test_dashboard_renders_every_page_from_a_write_protected_store still proves nothing is written")
    try:
        with pytest.raises(OSError):
            (db.parent / "probe").write_text("x")  # the mount really is read-only
        before = _state(db)
        _render_every_page(f"sqlite:///{db}", monkeypatch, every_run=False)
        assert _state(db) == before
    finally:  # lazily when busy: MLflow's cached engine may still hold the file open
        if subprocess.run(["umount", str(db.parent)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "--lazy", str(db.parent)], check=True, capture_output=True, timeout=30)


# -- (c) an MLflow server with basic authentication --------------------------------------------------------------
ADMIN = ("admin", "admin-" + secrets.token_hex(8))
USER = ("alice", "alice-" + secrets.token_hex(8))


def _request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, str]:
    """(HTTP status, body text) of a GET, or a JSON POST when `body` is given; with basic auth when `auth` is."""
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module", autouse=True)
def _auth_server_boot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server --app-name basic-auth` on a free port of 127.0.0.1, launched as this module starts.

    It takes ~20 s to boot on 2 busy cores, so it boots while the dashboard
    tests run (and not at all when no selected test needs it); `auth_server`
    waits for it. Its users live in their own sqlite file, named by
    basic_auth.ini (MLFLOW_AUTH_CONFIG_PATH), which also sets the admin's
    password: MLflow 3.17 ships none. Credential checks are cached for a
    minute (scrypt costs ~0.5 s a request here), and MLflow's job runner
    (7 worker processes kdarena never uses) is off.
    """
    wanted = any("auth_server" in item.fixturenames for item in request.session.items
                 if item.module is request.module)
    if not wanted:
        yield None
        return
    root = tmp_path_factory.mktemp("auth-server")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
                   f"admin_username = {ADMIN[0]}\n"
                   f"admin_password = {ADMIN[1]}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", str(root / "artifacts")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "root": root, "log": log, "proc": proc}
    finally:
        _stop(proc, group=True)


@pytest.fixture(scope="module")
def auth_server(_auth_server_boot: dict) -> dict:
    """The booted server, with one user (alice, default permission READ) made by the admin."""
    server = _auth_server_boot
    url = server["url"]
    wait_http(f"{url}/health", server["proc"], server["log"], "mlflow server --app-name basic-auth", timeout=180)
    status, text = _request(f"{url}/api/2.0/mlflow/users/create", ADMIN, {"username": USER[0], "password": USER[1]})
    assert status == 200, text
    return server


def _kdarena_train(url: str, work: Path, credentials: tuple[str, str] | None) -> subprocess.CompletedProcess:
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env |= {"KDARENA_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    if credentials:
        env |= {"MLFLOW_TRACKING_USERNAME": credentials[0], "MLFLOW_TRACKING_PASSWORD": credentials[1]}
    return subprocess.run([sys.executable, "-m", "kdarena.cli", "train", "--json", *FAST,
                           "--tracking-uri", url], capture_output=True, text=True, env=env, cwd=work, timeout=600)


def _run_count(url: str) -> int:
    status, text = _request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1000", ADMIN)
    assert status == 200, text
    ids = [e["experiment_id"] for e in json.loads(text).get("experiments", [])]
    status, text = _request(f"{url}/api/2.0/mlflow/runs/search", ADMIN, {"experiment_ids": ids, "max_results": 1000})
    assert status == 200, text
    return len(json.loads(text).get("runs", []))


def test_auth_server_refuses_anonymous_requests(auth_server: dict):
    url = auth_server["url"]
    status, text = _request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert status == 401, text
    assert _request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", (USER[0], "wrong"))[0] == 401
    assert _request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", USER)[0] == 200


def test_train_records_a_run_with_credentials(auth_server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = auth_server["url"]
    done = _kdarena_train(url, tmp_path / "work", USER)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)

    # read back with alice's credentials, through MLflow's client and kdarena's own reader
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    client = MlflowClient(url)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdarena.role"] == "train" and run.data.tags["kdarena.status"] == "completed"
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    assert {"student.pt", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = list((auth_server["root"] / "artifacts").rglob("student.pt"))  # proxied to the server's own storage
    assert any(summary["run_id"] in p.parts for p in stored), stored
    assert summary["run_id"] in set(lb_runs.load_runs(url)["run_id"])

    # and the server refuses the same read without them
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    status, _ = _request(f"{url}/api/2.0/mlflow/runs/get?run_id={summary['run_id']}")
    assert status == 401


def test_wrong_or_missing_credentials_fail_clearly_before_any_work(auth_server: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    url = auth_server["url"]
    runs_before = _run_count(url)

    done = _kdarena_train(url, tmp_path / "wrong", (USER[0], "not-the-password"))
    assert done.returncode == 2, done.stderr[-4000:]
    message = " ".join(done.stderr.split())
    assert f"the MLflow server at {url} refused the credentials of user 'alice' (HTTP 401)" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "wrong" / "cache").exists()  # no teacher trained

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "none" / "cache"))
    result = CliRunner().invoke(cli, ["train", *FAST, "--tracking-uri", url])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "requires authentication (HTTP 401) and no credentials are set" in message
    assert "MLFLOW_TRACKING_USERNAME" in message
    assert not (tmp_path / "none").exists()

    assert _run_count(url) == runs_before  # nothing half-written


def test_an_experiment_the_user_may_only_read_fails_clearly_and_writes_nothing(auth_server: dict, tmp_path: Path):
    """alice (default permission READ) into an experiment the admin owns: a 403 on the first write, not a traceback."""
    url = auth_server["url"]
    status, text = _request(f"{url}/api/2.0/mlflow/experiments/create", ADMIN, {"name": "admins-only"})
    assert status == 200, text
    runs_before = _run_count(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env |= {"MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1], "OMP_NUM_THREADS": "1",
            "KDARENA_CACHE": str(tmp_path / "cache")}
    sweep_file = tmp_path / "shared.yaml"
    sweep_file.write_text(json.dumps({
        "name": "shared", "experiment": "admins-only", "dataset": {"name": "digits"},
        "teacher": {"arch": "cnn", "options": {"channels": 4}}, "students": [{"arch": "cnn", "options": {"channels": 4}}],
        "methods": {"baseline": {}}, "budget": {"trials_per_method": 1, "epochs": 1}}))
    commands = {"train": (["train", *FAST, "--set", "experiment=admins-only"], "--set experiment=NAME"),
                "sweep": (["sweep", str(sweep_file), "--storage", str(tmp_path / "sweeps")], "`experiment:` in the sweep file")}
    for name, (args, fix) in commands.items():
        done = subprocess.run([sys.executable, "-m", "kdarena.cli", *args, "--tracking-uri", url],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 2, (name, done.stderr[-4000:])
        message = " ".join(done.stderr.split())
        assert f"the MLflow server at {url} refused to record into experiment 'admins-only' (HTTP 403" in message, name
        assert "EDIT permission" in message and fix in message and "Traceback" not in done.stderr, name
    assert not list(tmp_path.rglob("*.pt"))  # no teacher trained for a run that could not be recorded
    assert not (tmp_path / "sweeps" / "shared" / "records.json").exists()  # the sweep can start again as it is
    assert _run_count(url) == runs_before
