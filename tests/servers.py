"""Real servers on 127.0.0.1 for the remote-shard tests: Debian's nginx serving a folder, and
moto's S3 endpoint (server mode). Each runs as its own process on a free port, with its files
in a temporary folder; the tests stop (and restart) them. And a stalled server (a hung server
or proxy: it takes every connection and never answers), in the test's own process."""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # Debian's nginx lives in sbin


def nginx_missing_reason() -> str | None:
    """Why no nginx can be had here, or None (.ci/run installs it when missing)."""
    return None if shutil.which("nginx", path=SBIN) else "nginx is not installed (apt-get install nginx; .ci/run does)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited {process.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} is not listening on {port} after {timeout} s") from None
            time.sleep(0.05)


class Nginx:
    """nginx serving ``root`` on 127.0.0.1 (``/denied/...`` refused with 403; ``/login/...``
    answered with a sign-in page, as a login proxy does), stoppable and restartable on the same port."""

    def __init__(self, root: Path, folder: Path) -> None:
        self.root, self.folder, self.port = root, folder, free_port()
        self.process: subprocess.Popen | None = None
        for sub in ("temp", "logs"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf = folder / "nginx.conf"

    def _write_conf(self, limit_rate: str) -> None:
        # As root the workers would run as nobody, who can't read pytest's private tmp folders.
        user = "user root;" if os.geteuid() == 0 else ""
        temp = self.folder / "temp"
        folder, root = self.folder, self.root
        self.conf.write_text(f"""
daemon off;
worker_processes 1;
{user}
pid {folder}/nginx.pid;
error_log {folder}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        limit_rate {limit_rate};
        location /denied/ {{ deny all; }}
        location /login/ {{ default_type text/html; return 200 "<html><form>Sign in</form></html>"; }}
    }}
}}
""")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, limit_rate: str = "0") -> None:
        """Start serving; ``limit_rate``: bytes/s per response (nginx's syntax, 0: no limit)."""
        self._write_conf(limit_rate)
        nginx = shutil.which("nginx", path=SBIN)
        self.process = subprocess.Popen([nginx, "-p", str(self.folder), "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_listening(self.port, self.process, "nginx")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown; its worker goes with it
            self.process.wait(timeout=30)
        self.process = None


class MotoS3:
    """moto's S3 endpoint (``moto.server``) on 127.0.0.1, and the environment that points boto3 at it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_listening(self.port, self.process, "moto_server")

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "seg-test-key",
            "AWS_SECRET_ACCESS_KEY": "seg-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="seg-test-key", aws_secret_access_key="seg-test-secret")  # fmt: skip
        client.create_bucket(Bucket=bucket)
        for path in sorted(folder.iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Stalled:
    """A server on 127.0.0.1 that accepts every connection and never answers (socketserver,
    one thread per connection, each held open until ``stop``); ``connections`` counts them."""

    def __init__(self) -> None:
        self.connections, self.released = 0, threading.Event()
        stalled = self

        class Hold(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                stalled.connections += 1
                stalled.released.wait()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hold)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)
