"""Webhook faults against a real `mhpo serve`: the target policy (at save time and at send
time), what is stored of a reply, a trickling receiver, a huge reply, a full queue.

Receivers here are raw sockets on this machine, so every behaviour is scripted byte by byte.
Run as a script (`python -m tests.flags.test_webhook_faults`) to print the target table.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhpo_server.monitoring.targets import TargetPolicy, TargetRefused, address_kind
from tests.fixtures.server import LiveServer

DEADLINE_S = 3
ENV = {
    "MHPO_WEBHOOK_TIMEOUT_S": str(DEADLINE_S),
    "MHPO_WEBHOOK_MAX_ATTEMPTS": "1",
    "MHPO_WEBHOOK_BACKOFF_S": "0",
    "MHPO_WEBHOOK_WORKERS": "4",
    "MHPO_WEBHOOK_ALLOW_CIDRS": "127.0.0.2/32",  # the receivers' address; the rest of loopback stays refused
}
RECEIVER_HOST = "127.0.0.2"
SECRET = b"INTERNAL-ONLY: db_password=hunter2"

# (URL, refused by default?) -- every spelling of an internal target the issue names and more.
TARGETS: list[tuple[str, bool]] = [
    ("http://169.254.169.254/latest/meta-data/", True),
    ("http://2852039166/", True),  # 169.254.169.254 as one decimal number
    ("http://0xa9fea9fe/", True),  # ... in hex
    ("http://0x7f000001/", True),  # 127.0.0.1 in hex
    ("http://0177.0.0.1/", True),  # ... in octal
    ("http://127.1:6379/", True),  # short form, Redis port
    ("http://127.0.0.1:5432/", True),
    ("http://[::1]:8765/", True),
    ("http://[::ffff:127.0.0.1]/", True),  # IPv4-mapped IPv6
    ("http://[::ffff:a9fe:a9fe]/", True),
    ("http://[64:ff9b::a9fe:a9fe]/", True),  # NAT64
    ("http://[fd00:ec2::254]/", True),  # AWS metadata over IPv6
    ("http://[fe80::1]/", True),
    ("http://metadata.google.internal/computeMetadata/v1/", True),
    ("http://metadata.google.internal./", True),
    ("http://localhost:8765/", True),
    ("http://app.localhost/", True),
    ("http://10.0.0.1/", True),
    ("http://172.16.5.4/", True),
    ("http://192.168.1.1/", True),
    ("http://100.64.0.1/", True),  # shared address space (CGNAT)
    ("http://0.0.0.0:8765/", True),
    ("http://224.0.0.251/", True),
    ("http://255.255.255.255/", True),
    ("http://240.0.0.1/", True),
    ("http://user:pass@hooks.example.com/x", True),
    ("https://hooks.slack.com/services/T000/B000/XXXX", False),
    ("https://93.184.215.14/hook", False),
    ("https://[2606:4700:4700::1111]/hook", False),
    ("http://hooks.example.com:8080/alerts", False),
]


def target_table(policy: TargetPolicy | None = None) -> list[tuple[str, str, str]]:
    """(URL, "allowed" | "refused", reason) for every row of TARGETS under `policy`."""
    policy = policy or TargetPolicy()
    rows = []
    for url, _ in TARGETS:
        try:
            policy.check_url(url)
            rows.append((url, "allowed", ""))
        except TargetRefused as exc:
            rows.append((url, "refused", str(exc).split(";")[0]))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(url) for url, _, _ in rows)
    print(f"\n{'webhook_url':<{width}}  {'verdict':<8} reason")
    for url, verdict, reason in rows:
        print(f"{url:<{width}}  {verdict:<8} {reason}")


# --- scripted receivers --------------------------------------------------------------------


class RawReceiver:
    """A TCP server whose `handle(conn)` is scripted per test; records what it saw."""

    def __init__(self, handle: Callable[[socket.socket, RawReceiver], None], host: str = RECEIVER_HOST) -> None:
        self.handle = handle
        self.requests: list[bytes] = []
        self.connected = threading.Event()
        self.closed_by_peer = threading.Event()
        self.sent = 0
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver.connected.set()
                try:
                    receiver.handle(self.request, receiver)
                except OSError:
                    receiver.closed_by_peer.set()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host or '127.0.0.1'}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        return head

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(status: bytes, body: bytes = b"") -> Callable[[socket.socket, RawReceiver], None]:
    def handle(conn: socket.socket, receiver: RawReceiver) -> None:
        receiver.read_request(conn)
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    return handle


def trickle(conn: socket.socket, receiver: RawReceiver) -> None:
    """A status line and headers, one byte every 2 s, never finished."""
    receiver.read_request(conn)
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
        conn.sendall(bytes([byte]))
        receiver.sent += 1
        time.sleep(2)


HUGE = 512 * 1024 * 1024


def huge_reply(conn: socket.socket, receiver: RawReceiver) -> None:
    """A 500 with a 512 MiB body, written until the server hangs up."""
    receiver.read_request(conn)
    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % HUGE)
    chunk = SECRET + b"x" * (1024 * 1024 - len(SECRET))
    while receiver.sent < HUGE:
        conn.sendall(chunk)
        receiver.sent += len(chunk)


def endless_headers(conn: socket.socket, receiver: RawReceiver) -> None:
    receiver.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while receiver.sent < HUGE:
        conn.sendall(b"X-Pad: " + b"p" * 1000 + b"\r\n")
        receiver.sent += 1009


def hold(conn: socket.socket, receiver: RawReceiver) -> None:
    receiver.read_request(conn)
    time.sleep(DEADLINE_S + 5)


def not_http(conn: socket.socket, receiver: RawReceiver) -> None:
    """An open port speaking another protocol (as Redis or PostgreSQL would)."""
    receiver.read_request(conn)
    conn.sendall(b"-ERR unknown command 'POST'\r\n")


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = Path(tmp_path_factory.mktemp("webhook-faults")) / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", env=ENV) as live:
        yield live


@pytest.fixture
def receivers() -> Iterator[list[RawReceiver]]:
    made: list[RawReceiver] = []
    yield made
    for r in made:
        r.close()


def new_rule(server: LiveServer, url: str, project: str | None = None) -> tuple[str, httpx.Response]:
    project = project or f"p{uuid.uuid4().hex[:8]}"
    run_id = httpx.post(f"{server.url}/api/v1/runs", json={"project": project, "name": "r"}).json()["run_id"]
    rule = httpx.post(
        f"{server.url}/api/v1/alert-rules",
        json={
            "name": "loss high",
            "project": project,
            "run_id": run_id,
            "cooldown_s": 0,
            "condition": {"type": "threshold", "key": "loss", "op": ">", "value": 1.0},
            "channels": ["webhook"],
            "webhook_url": url,
        },
    )
    return run_id, rule


def hooked_run(server: LiveServer, url: str) -> str:
    run_id, rule = new_rule(server, url)
    assert rule.status_code == 201, rule.text
    return run_id


def post_loss(server: LiveServer, run_id: str, values: list[float]) -> None:
    records = [{"step": i, "time": 1.7e9 + i, "scalars": {"loss": v}} for i, v in enumerate(values)]
    r = httpx.post(
        f"{server.url}/api/v1/runs/{run_id}/records",
        json={"batch_id": uuid.uuid4().hex, "records": records},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def alerts_of(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(server: LiveServer, run_id: str, count: int = 1) -> list[dict[str, Any]] | None:
    found = alerts_of(server, run_id)
    done = [a for a in found if a["delivery_status"] in {"delivered", "failed"}]
    return found if len(done) >= count and len(done) == len(found) else None


def metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0])
    return fields


# --- the target policy -----------------------------------------------------------------------


def test_target_table_at_save_time(server: LiveServer) -> None:
    """Each URL of the table through POST /api/v1/alert-rules: 422 naming webhook_url, or 201."""
    rows = target_table()
    print_table(rows)
    for (url, refused), (_, verdict, reason) in zip(TARGETS, rows, strict=True):
        assert verdict == ("refused" if refused else "allowed"), (url, reason)
        _, response = new_rule(server, url)
        if refused:
            assert response.status_code == 422, (url, response.text)
            (error,) = response.json()["detail"]
            assert error["loc"] == ["body", "webhook_url"]
            assert "MHPO_WEBHOOK_ALLOW" in error["msg"] or "credentials" in error["msg"], error
        else:
            assert response.status_code == 201, (url, response.text)


def test_patch_to_an_internal_target_is_refused(server: LiveServer) -> None:
    _, rule = new_rule(server, "https://hooks.example.com/x")
    patched = httpx.patch(
        f"{server.url}/api/v1/alert-rules/{rule.json()['id']}", json={"webhook_url": "http://2852039166/"}
    )
    assert patched.status_code == 422 and patched.json()["detail"][0]["loc"] == ["body", "webhook_url"]
    assert "169.254.169.254" in patched.text


def test_allow_list_admits_an_internal_receiver() -> None:
    policy = TargetPolicy.from_settings(["hooks.internal"], ["10.0.5.0/24"])
    policy.check_url("http://hooks.internal/alerts")
    policy.check_url("http://10.0.5.7/alerts")
    policy.check_url("http://[::ffff:10.0.5.7]/alerts")
    with pytest.raises(TargetRefused, match="private"):
        policy.check_url("http://10.0.6.7/alerts")
    with pytest.raises(TargetRefused, match="credentials"):
        policy.check_url("http://u:p@hooks.internal/alerts")


def local_name() -> str:
    """This machine's host name when it resolves only to non-public addresses (it does in containers and CI)."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"host name {name!r} does not resolve")
    if not all(address_kind(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
        pytest.skip(f"host name {name!r} resolves to a public address")
    return name


def test_a_name_resolving_inside_is_refused_at_send_time(server: LiveServer, receivers: list[RawReceiver]) -> None:
    """The name passes the save-time check (it is no literal address); the resolved address is refused, nothing is sent."""
    name = local_name()
    receiver = RawReceiver(answer(b"200 OK"), host="")
    receivers.append(receiver)
    run_id = hooked_run(server, f"http://{name}:{receiver.port}/hook")
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("the delivery to settle", lambda: settled(server, run_id))
    assert alert["delivery_status"] == "failed"
    assert alert["delivery_error"].startswith(
        f"refused by the webhook target policy: host {name} resolves to a non-public"
    )
    assert receiver.requests == [] and not receiver.connected.is_set()


def test_an_allowed_name_connects_to_the_checked_address_with_its_host_header(
    tmp_path: Path, receivers: list[RawReceiver]
) -> None:
    name = local_name()
    receiver = RawReceiver(answer(b"204 No Content"), host="")
    receivers.append(receiver)
    with LiveServer(f"sqlite:///{tmp_path / 'mhpo.db'}", env={**ENV, "MHPO_WEBHOOK_ALLOW_HOSTS": name}) as live:
        run_id = hooked_run(live, f"http://{name}:{receiver.port}/hook")
        post_loss(live, run_id, [0.5, 2.0])
        (alert,) = wait_for("the delivery", lambda: settled(live, run_id))
    assert alert["delivery_status"] == "delivered", alert
    (request,) = receiver.requests
    assert f"\r\nhost: {name}:{receiver.port}\r\n".encode() in request.lower()


# --- what is stored of a reply -----------------------------------------------------------------


def test_only_the_status_is_stored_never_the_body(server: LiveServer, receivers: list[RawReceiver]) -> None:
    receiver = RawReceiver(answer(b"500 " + SECRET, SECRET))
    receivers.append(receiver)
    run_id = hooked_run(server, receiver.url)
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("the delivery to settle", lambda: settled(server, run_id))
    assert alert["delivery_error"] == "HTTP 500 Internal Server Error"
    assert b"hunter2" not in httpx.get(f"{server.url}/api/v1/alerts").content


def test_connection_failures_read_the_same(server: LiveServer, receivers: list[RawReceiver]) -> None:
    """A closed port, an open port speaking another protocol, a reset: one message, no port state."""
    closed = RawReceiver(answer(b"200 OK"))
    closed.close()
    other = RawReceiver(not_http)
    reset = RawReceiver(lambda conn, r: conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"))
    receivers += [other, reset]
    errors = set()
    for url in (closed.url, other.url, reset.url):
        run_id = hooked_run(server, url)
        post_loss(server, run_id, [0.5, 2.0])
        (alert,) = wait_for("the delivery to settle", lambda: settled(server, run_id))
        assert alert["delivery_status"] == "failed"
        errors.add(alert["delivery_error"])
    assert errors == {f"no HTTP reply within {DEADLINE_S} s (connection failed, closed, too slow or not HTTP)"}


# --- deadlines, limits, workers, queue -------------------------------------------------------------


def test_a_trickling_receiver_does_not_delay_an_unrelated_alert(
    server: LiveServer, receivers: list[RawReceiver]
) -> None:
    """One byte every 2 s never trips a per-read timeout; the total deadline ends it, and other alerts go meanwhile."""
    slow = RawReceiver(trickle)
    fast = RawReceiver(answer(b"200 OK"))
    receivers += [slow, fast]
    slow_run = hooked_run(server, slow.url)
    fast_run = hooked_run(server, fast.url)
    post_loss(server, slow_run, [0.5, 2.0])
    wait_for("the trickling receiver to be reached", slow.connected.is_set)
    post_loss(server, fast_run, [0.5, 2.0])
    (delivered,) = wait_for("the unrelated alert", lambda: settled(server, fast_run))
    assert delivered["delivery_status"] == "delivered"
    assert alerts_of(server, slow_run)[0]["delivery_status"] == "pending", "the slow delivery is still going on"
    (slow_alert,) = wait_for("the slow delivery to hit its deadline", lambda: settled(server, slow_run))
    assert slow_alert["delivery_status"] == "failed"
    assert slow_alert["delivery_error"].startswith(f"no HTTP reply within {DEADLINE_S} s")
    wait_for("the server to hang up on the trickle", slow.closed_by_peer.is_set, timeout=30)
    assert slow.sent < 10_000


def test_a_huge_reply_is_not_read(server: LiveServer, receivers: list[RawReceiver]) -> None:
    """A 512 MiB reply: the server reads at most its read limit, and its memory does not grow."""
    assert server.pid is not None
    receiver = RawReceiver(huge_reply)
    receivers.append(receiver)
    run_id = hooked_run(server, receiver.url)
    read_before = metric(server, "mhpo_webhook_reply_bytes_read_total")
    memory_before = memory_kib(server.pid)
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("the delivery to settle", lambda: settled(server, run_id))
    wait_for("the server to hang up", receiver.closed_by_peer.is_set, timeout=30)
    memory_after = memory_kib(server.pid)
    read = metric(server, "mhpo_webhook_reply_bytes_read_total") - read_before
    print(
        f"\nhuge reply: offered {HUGE >> 20} MiB, receiver wrote {receiver.sent / 2**20:.1f} MiB before the hang-up, "
        f"server read {read:.0f} bytes; RSS {memory_before['VmRSS'] >> 10} -> {memory_after['VmRSS'] >> 10} MiB, "
        f"peak {memory_before['VmHWM'] >> 10} -> {memory_after['VmHWM'] >> 10} MiB"
    )
    assert alert["delivery_error"] == "HTTP 500 Internal Server Error"
    assert 0 < read <= 8192
    assert receiver.sent < HUGE // 8
    assert memory_after["VmRSS"] - memory_before["VmRSS"] < 32 * 1024
    assert memory_after["VmHWM"] - memory_before["VmHWM"] < 32 * 1024


def test_endless_reply_headers_stop_at_the_read_limit(server: LiveServer, receivers: list[RawReceiver]) -> None:
    receiver = RawReceiver(endless_headers)
    receivers.append(receiver)
    run_id = hooked_run(server, receiver.url)
    post_loss(server, run_id, [0.5, 2.0])
    (alert,) = wait_for("the delivery to settle", lambda: settled(server, run_id))
    assert alert["delivery_error"] == "the reply headers exceed 8192 bytes (MHPO_WEBHOOK_READ_LIMIT_BYTES)"


def test_a_full_queue_fails_deliveries_at_once_and_counts_them(tmp_path: Path, receivers: list[RawReceiver]) -> None:
    receiver = RawReceiver(hold)
    receivers.append(receiver)
    env = {**ENV, "MHPO_WEBHOOK_WORKERS": "1", "MHPO_WEBHOOK_QUEUE_SIZE": "1"}
    with LiveServer(f"sqlite:///{tmp_path / 'mhpo.db'}", env=env) as live:
        run_id = hooked_run(live, receiver.url)
        post_loss(live, run_id, [0.5, 2.0, 0.5, 2.0, 0.5, 2.0])  # three firings at once
        alerts = wait_for("three deliveries to settle", lambda: settled(live, run_id, 3))
        dropped = [a for a in alerts if a["delivery_error"] and "queue was full" in a["delivery_error"]]
        assert 1 <= len(dropped) <= 2
        assert all(a["delivery_status"] == "failed" and a["delivery_attempts"] == 0 for a in dropped)
        assert "MHPO_WEBHOOK_QUEUE_SIZE" in dropped[0]["delivery_error"]
        assert metric(live, 'mhpo_webhook_deliveries_total{result="dropped"}') == len(dropped)
        assert metric(live, "mhpo_webhook_queue_depth") == 0


if __name__ == "__main__":
    print_table(target_table())
