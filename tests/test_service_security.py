"""What an outside probe of the daemon broke, each with the test that would have caught it.

Real servers only: uvicorn on 127.0.0.1 in a thread, or `routescan serve` as its own process on a
Unix socket; SQLite on disk.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import A_LAUNCH, post_body, score_body, service_settings, uvicorn_thread

from routescan.service.app import create_app

SECRET = "tell me how to pick the lock on my neighbours door"


settings = service_settings
body = score_body


@pytest.fixture
def server(tmp_path, test_detector, monkeypatch):
    monkeypatch.delenv("ROUTESCAN_API_TOKEN", raising=False)
    with uvicorn_thread(create_app(settings(tmp_path), detector=test_detector)) as base:
        yield base


def _stored(base: str) -> list[dict]:
    return httpx.get(f"{base}/v1/audits").json()["items"]


# -- 2, 3: the Unix socket -------------------------------------------------------------------------
@contextlib.contextmanager
def _daemon_on_socket(sock: Path, db: Path, *extra: str) -> Iterator[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "ROUTESCAN_API_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "routescan.cli.main", "serve", "--uds", str(sock), "--db", str(db), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not come up")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


def _answers(sock: Path) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=2) as client:
            return client.get("http://routescan/readyz").status_code == 200
    except (httpx.HTTPError, OSError):
        return False


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700), so only the socket's own
    mode decides who may connect."""
    path = Path(tempfile.mkdtemp(prefix="routescan-uds-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_socket_is_0660_and_refuses_other_users(shared_dir) -> None:
    sock = shared_dir / "routescan.sock"
    with _daemon_on_socket(sock, shared_dir / "audit.sqlite3"):
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o660
        assert _answers(sock)
        system_python = Path("/usr/bin/python3")  # the venv's interpreter may sit under a 0700 home
        if os.geteuid() != 0 or not system_python.exists():
            pytest.skip("connecting as another uid needs root and a system python3")
        probe = (
            "import socket,sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
            "sys.exit(0)\n"
        )
        other = subprocess.run(
            [str(system_python), "-c", probe, str(sock)], user=65534, group=65534, timeout=30, cwd="/"
        )
        assert other.returncode == 13, "a user outside the socket's owner and group could connect"


def test_socket_mode_and_group_are_configurable(shared_dir) -> None:
    sock = shared_dir / "g.sock"
    with _daemon_on_socket(
        sock, shared_dir / "a.sqlite3", "--uds-mode", "0600", "--uds-group", str(os.getgid())
    ):
        info = sock.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_gid == os.getgid()


def _serve_once(sock: Path, db: Path) -> subprocess.CompletedProcess:
    """A second `routescan serve --uds` that must refuse at once (a hang here means it took the path)."""
    env = {k: v for k, v in os.environ.items() if k != "ROUTESCAN_API_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "routescan.cli.main", "serve", "--uds", str(sock), "--db", str(db)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_socket_path_is_never_taken_from_a_file_or_a_live_daemon(shared_dir, tmp_path) -> None:
    regular = shared_dir / "notes.txt"
    regular.write_text("keep me")
    result = _serve_once(regular, tmp_path / "a.db")
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert regular.read_text() == "keep me"

    sock = shared_dir / "live.sock"
    with _daemon_on_socket(sock, shared_dir / "b.sqlite3"):
        result = _serve_once(sock, tmp_path / "b.db")
        assert result.returncode == 2 and "another process is listening" in " ".join(result.stderr.split())
        assert _answers(sock), "the first daemon lost its socket"

    stale = shared_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays: what a SIGKILLed daemon leaves behind
    with _daemon_on_socket(stale, shared_dir / "c.sqlite3"):
        assert _answers(stale)


# -- 4: browsers ------------------------------------------------------------------------------------
def test_cross_site_browser_requests_are_refused(server, synthetic_traces) -> None:
    payload = json.dumps(body(synthetic_traces[0]))
    r = httpx.post(f"{server}/v1/score", content=payload, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{server}/v1/score", data={"trace": payload})  # an HTML form post
    assert r.status_code == 415
    r = httpx.post(
        f"{server}/v1/score",
        content=payload,
        headers={"content-type": "application/json", "origin": "http://evil.example"},
    )
    assert r.status_code == 403
    r = httpx.get(f"{server}/v1/audits", headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    # DNS rebinding: the page's own name resolves to 127.0.0.1, so the browser sends its Host
    r = httpx.get(f"{server}/v1/audits", headers={"host": "evil.example:8787"})
    assert r.status_code == 400
    assert _stored(server) == [], "a refused request was stored"
    host = server.removeprefix("http://")
    same_origin = {"origin": f"http://{host}", "content-type": "application/json"}
    assert httpx.post(f"{server}/v1/score", content=payload, headers=same_origin).status_code == 200
    assert (
        httpx.get(f"{server}/v1/audits", headers={"host": f"localhost:{host.split(':')[1]}"}).status_code
        == 200
    )


# -- 5: text through ids, kernel names, label keys, refused keys ------------------------------------
@pytest.mark.parametrize(
    "where",
    ["sentence_id", "underscored_id", "base64_id", "kernel_sentence", "label_key_words", "huge_unknown_key"],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_text_cannot_ride_in_identifiers(server, synthetic_traces, where: str, binary: bool) -> None:
    payload = body(synthetic_traces[0])
    trace = payload["trace"]
    if where == "sentence_id":
        trace["trace_id"] = "tell-me-how-to-pick-the-lock"
    elif where == "underscored_id":
        trace["trace_id"] = "how_to_pick_a_lock"
    elif where == "base64_id":
        trace["trace_id"] = base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=")[:90]
    elif where == "kernel_sentence":
        trace["launches"] = [{**A_LAUNCH, "kernel": SECRET}]
    elif where == "label_key_words":
        trace["labels"]["how_to_pick_the_lock"] = 1
    else:
        trace["x" * 92_000] = 1
    r = post_body(f"{server}/v1/score", payload, binary=binary)
    assert r.status_code == 422, r.text[:300]
    assert "pick" not in r.text and "lock" not in r.text and "xxxxxxxxxxxxxxxx" not in r.text
    assert len(r.content) < 4000
    assert _stored(server) == []


def test_ids_collectors_emit_still_pass() -> None:
    from routescan.telemetry.schema import clean_kernel_name, kernel_name_problem, trace_id_problem

    for ident in (
        "h-00012",
        "w-h-00012-3fa9c2d1",
        "x0-harmbench-00012",
        "row-0000001",
        "chatcmpl-0123456789abcdef0123456789abcdef-1a2b3c4d",
        "123e4567-e89b-12d3-a456-426614174000",
    ):
        assert trace_id_problem(ident) is None, ident
    cpp = "void at::native::(anonymous namespace)::gather<float, long, unsigned int, 2>(float const*, int)"
    assert kernel_name_problem(cpp) is None
    assert kernel_name_problem(clean_kernel_name(SECRET)) is None  # CUPTI names are cleaned, not refused


# -- 6: docs, file modes, auth before the body ------------------------------------------------------
def test_docs_need_the_token_and_unauthenticated_bodies_are_not_read(
    tmp_path, test_detector, monkeypatch
) -> None:
    monkeypatch.setenv("ROUTESCAN_API_TOKEN", "s3cret-token-value")
    with uvicorn_thread(create_app(settings(tmp_path), detector=test_detector)) as base:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
        good = {"Authorization": "Bearer s3cret-token-value"}
        assert httpx.get(f"{base}/openapi.json", headers=good).json()["info"]["title"] == "RouteScan"
        assert httpx.get(f"{base}/docs", headers=good).status_code == 200
        big = b"{" + b" " * (9 << 20) + b"}"
        r = httpx.post(f"{base}/v1/score", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 401, "a 9 MB body without a token must be refused for the token, unread"
        bare = {"Authorization": "Bearer"}
        assert httpx.get(f"{base}/v1/audits", headers=bare).status_code == 401
    db = tmp_path / "audit.sqlite3"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_agent_spool_is_private_and_not_in_tmp(tmp_path, monkeypatch) -> None:
    from routescan.agent.sender import TraceSender, default_spool_path

    assert not str(default_spool_path()).startswith("/tmp")
    spool = tmp_path / "state" / "spool.jsonl"
    sender = TraceSender("http://127.0.0.1:9", spool=spool, retry_interval_s=60, timeout_s=0.2)
    try:
        sender._append_spool(['{"x": 1}'])
    finally:
        sender.close(timeout_s=5)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.parent.stat().st_mode) == 0o700


# -- 7, 8: one client cannot fail everyone; huge numbers ------------------------------------------
def test_out_of_range_inputs_are_4xx_and_nobody_else_fails(server, synthetic_traces, test_detector) -> None:
    from routescan.features.fingerprint import fingerprint

    fp = fingerprint(synthetic_traces[0], test_detector.spec).model_dump(mode="json")
    fp["values"] = [1e308] * len(fp["values"])
    huge_threads = body(synthetic_traces[1])
    huge_threads["trace"].update(unit="threads", source="hf-eager")
    huge_threads["trace"]["counts"][0][0] = 10**310
    huge_tokens = body(synthetic_traces[2])
    huge_tokens["trace"]["prompt_tokens"] = 10**309
    string_number = body(synthetic_traces[3])
    string_number["trace"]["prompt_tokens"] = "5"

    results: dict[str, int] = {}

    def post(name: str, payload: dict) -> None:
        results[name] = httpx.post(f"{server}/v1/score", json=payload, timeout=30).status_code

    jobs = [("nan", {"fingerprint": fp}), ("threads", huge_threads), ("tokens", huge_tokens)]
    jobs += [("strict", string_number)] + [
        (f"good{i}", body(t)) for i, t in enumerate(synthetic_traces[4:10])
    ]
    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: v for k, v in results.items() if not k.startswith("good")} == {
        "nan": 422,
        "threads": 422,
        "tokens": 422,
        "strict": 422,
    }
    assert all(v == 200 for k, v in results.items() if k.startswith("good")), results
    assert len(_stored(server)) == 6
    metrics = httpx.get(f"{server}/metrics").text
    assert "routescan_store_errors_total 0.0" in metrics
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_empty_traces_are_refused_not_flagged(server, synthetic_traces) -> None:
    empty = body(synthetic_traces[0])
    empty["trace"]["counts"] = [[0] * n for n in empty["trace"]["experts_per_layer"]]
    r = httpx.post(f"{server}/v1/score", json=empty)
    assert r.status_code == 422 and "nothing to score" in r.text
    measured = body(synthetic_traces[0])  # zero threads measured: as empty
    measured["trace"].update(unit="threads", source="hf-eager", counts=empty["trace"]["counts"])
    assert httpx.post(f"{server}/v1/score", json=measured).status_code == 422
    no_layers = body(synthetic_traces[0])
    no_layers["trace"].update(layers=[], experts_per_layer=[], counts=[], top_k=[])
    assert httpx.post(f"{server}/v1/score", json=no_layers).status_code == 422
    assert _stored(server) == []


# -- 11: big requests leave the event loop free -----------------------------------------------------
def test_a_big_request_does_not_block_probes(tmp_path, test_detector, synthetic_traces, monkeypatch) -> None:
    monkeypatch.delenv("ROUTESCAN_API_TOKEN", raising=False)
    trace = body(synthetic_traces[0])
    launches = [A_LAUNCH]
    trace["trace"]["launches"] = launches * 80_000  # ~7.8 MB: a body that takes a while to parse
    payload = json.dumps(trace).encode()
    assert len(payload) < 8 << 20
    with uvicorn_thread(create_app(settings(tmp_path), detector=test_detector)) as base:
        done = threading.Event()
        big: dict[str, int] = {}

        def send() -> None:
            r = httpx.post(
                f"{base}/v1/score", content=payload, headers={"content-type": "application/json"}, timeout=120
            )
            big["status"] = r.status_code
            done.set()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.1)  # the body is uploaded and parsing has begun
        probes_before_done = 0
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                assert client.get(f"{base}/healthz").status_code == 200
                if not done.is_set():
                    probes_before_done += 1
                time.sleep(0.02)
        sender.join()
        assert big["status"] == 200
        assert probes_before_done >= 3, "probes waited for the big request's parse"

        flood = b'{"trace": {' + b",".join(b'"k%d": 1' % i for i in range(200_000)) + b"}}"
        r = httpx.post(
            f"{base}/v1/score", content=flood, headers={"content-type": "application/json"}, timeout=60
        )
        assert (
            r.status_code == 422 and "200000 fields" in r.text
        )  # refused before pydantic builds 200k errors

        too_many = body(synthetic_traces[0])
        too_many["trace"]["launches"] = [launches[0]] * 140_000
        r = httpx.post(f"{base}/v1/score", json=too_many, timeout=60)
        assert r.status_code in (413, 422)

        # the binary wire bounds maps, strings and binary values in its decoder, before validation
        import msgpack

        from routescan.telemetry.wire import MEDIA_TYPE

        wire = {"content-type": MEDIA_TYPE}
        flood = msgpack.packb({"trace": {f"k{i}": 1 for i in range(200_000)}})
        r = httpx.post(f"{base}/v1/score", content=flood, headers=wire, timeout=60)
        assert r.status_code == 422 and "at most 64 fields" in r.text
        smuggled = body(synthetic_traces[0])
        smuggled["trace"]["trace_id"] = SECRET.encode()  # bytes, not a string
        r = httpx.post(f"{base}/v1/score", content=msgpack.packb(smuggled), headers=wire, timeout=60)
        assert r.status_code == 422 and "pick" not in r.text
        r = httpx.post(f"{base}/v1/score", content=b"\xc1\x00garbage", headers=wire, timeout=60)
        assert r.status_code == 422 and "not valid MessagePack" in r.text
