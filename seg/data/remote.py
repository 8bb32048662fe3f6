"""Where a packed dataset lives: a local folder, an ``http(s)://`` or ``s3://`` URL, or (opted
in) a ``pipe:`` command template. The manifest and the shards are read from the same place.

A remote shard is fetched whole into a file (a temporary one, or the cache folder) while its
sha256 is computed from the bytes as they arrive; its samples are used only once its last
byte matched the manifest (size and sha256), so a corrupted or truncated transfer never
reaches training. A transfer that fails, is cut short or does not match is retried a bounded
number of times, each retry said on stderr (what it waits for, which try, the timeout), then
one line names the URL, the shard and the problem. 403 and 404 are not retried: they say which
URL and what to check. A manifest answered with an HTML page (a login page, a proxy's) says so.
Anything else written as a URL (``ftp://``, ``http:/x``) is refused as such, never read as a
folder.

Credentials never come from ``data.shards`` (it is written to config.yaml and wandb): S3's
come from boto3's usual environment (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for an S3-compatible store), and a URL carrying a user or a query
string is refused. A ``pipe:`` template runs a program, so a config received from someone
else could run anything: it is accepted only with ``SEG_ALLOW_PIPE=1`` in the environment,
and it is split into arguments before the shard's name is put in (never a shell).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SCHEMES = ("http://", "https://", "s3://", "pipe:")
URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^(https?|s3):", re.IGNORECASE)  # ftp://..., http:/x, s3:x
PIPE_OPT_IN = "SEG_ALLOW_PIPE"
ATTEMPTS = 3  # tries per transfer: a dropped connection or a restarted server gets two more
TIMEOUT_S = 15.0  # per socket operation (connect, each read), not per shard: pip's and requests' usual 15 s
BLOCK = 1 << 20
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a manifest's shard names, and manifest.json


class RemoteError(OSError):
    """A remote dataset that cannot be read: one line naming the URL and what to check."""


class _RetryableError(Exception):
    """A transfer that may succeed when tried again (a dropped connection, a 5xx, short or bad bytes)."""


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is written as a URL (Store.of refuses the schemes it cannot read),
    not a folder."""
    return str(location).startswith(SCHEMES) or bool(URL_LIKE.match(str(location)))


def _pause(seconds: float) -> None:
    """The wait between tries (the tests replace it to act between them)."""
    time.sleep(seconds)


@dataclass(frozen=True)
class Store:
    """A remote packed dataset: ``location`` as ``data.shards`` names it (without credentials)."""

    location: str

    @classmethod
    def of(cls, location: str) -> Store:
        """The store at ``location``; RemoteError if it carries credentials, is a ``pipe:``
        template without the opt-in, or a URL of another scheme or a malformed one."""
        if location.startswith("pipe:"):
            if os.environ.get(PIPE_OPT_IN) != "1":
                raise RemoteError(
                    f"data.shards {location!r} runs a command: set {PIPE_OPT_IN}=1 to allow pipe: locations "
                    "(only for configs you trust)"
                )
            if "{name}" not in location:
                raise RemoteError(f"data.shards {location!r}: a pipe: template needs {{name}} where the file name goes")
            return cls(location)
        parts = urllib.parse.urlsplit(location)
        hidden = parts.username or parts.password or parts.query or parts.fragment
        shown = urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", "")) + "..."
        scheme = location.split(":", 1)[0]
        if not location.startswith(SCHEMES):
            if "://" in location:
                raise RemoteError(
                    f"unsupported scheme {scheme}:// in data.shards {shown if hidden else location}: "
                    f"use a folder, http(s):// or s3://{' (in lower case)' if URL_LIKE.match(scheme + ':') else ''}"
                )
            raise RemoteError(
                f"data.shards {location}: a malformed {scheme} URL (two slashes after '{scheme}:'): "
                f"write {scheme.lower()}://{'BUCKET/PREFIX' if scheme.lower() == 's3' else 'HOST/PATH'}, or a folder"
            )
        if hidden:
            raise RemoteError(
                f"data.shards {shown}: a user, password or query in the URL would be written to config.yaml "
                "and wandb; give credentials through the environment (S3: AWS_* variables or AWS_PROFILE)"
            )
        if not parts.netloc:
            raise RemoteError(f"data.shards {location!r}: no host or bucket")
        return cls(location.rstrip("/"))

    def url(self, name: str) -> str:
        if self.location.startswith("pipe:"):
            return f"{self.location} ({name})"
        return f"{self.location}/{urllib.parse.quote(name)}"

    def read(self, name: str) -> bytes:
        """The whole of a small file (the manifest), with the same retries as a shard."""
        return self._tries(name, lambda: self._read_whole(name))

    def _read_whole(self, name: str) -> bytes:
        with self._open(name) as stream:
            headers = getattr(stream, "headers", None)  # HTTP's; S3 and pipe: have none to go by
            if headers is not None and headers.get_content_type() == "text/html":
                raise RemoteError(
                    f"{self.url(name)}: got text/html (the Content-Type), not JSON: a login page or a proxy's "
                    "answer? check data.shards, and that the URL serves the packed folder's files as they are"
                )
            return _read_all(stream)

    def fetch(self, name: str, size: int, sha256: str, into: Path) -> None:
        """Shard ``name`` into the file ``into`` (atomically: whole and matching, or not at all)."""
        self._tries(name, lambda: self._download(name, size, sha256, into), f"shard {name}: ")

    def _tries(self, name: str, attempt: Any, what: str = "") -> Any:
        _check_name(name)
        for n in range(1, ATTEMPTS + 1):
            try:
                return attempt()
            except _RetryableError as e:
                problem = str(e)
            if n < ATTEMPTS:  # said, so that a slow server is no silence (each try may wait TIMEOUT_S per read)
                print(
                    f"waiting for {self.url(name)} (try {n + 1} of {ATTEMPTS}, timeout {TIMEOUT_S:g} s): "
                    f"try {n}: {what}{problem}",
                    file=sys.stderr,
                    flush=True,
                )
                _pause(2 ** (n - 1))
        raise RemoteError(f"{self.url(name)}: {what}{problem} (tried {ATTEMPTS} times)")

    def _download(self, name: str, size: int, sha256: str, into: Path) -> None:
        digest, count = hashlib.sha256(), 0
        fd, part = tempfile.mkstemp(prefix=f".{into.name}.", suffix=".part", dir=into.parent)
        try:
            with os.fdopen(fd, "wb") as out, self._open(name) as stream:
                while block := _read(stream, BLOCK):
                    count += len(block)
                    if count > size:
                        raise _RetryableError(f"longer than the manifest's {size} bytes; republish the packed folder")
                    digest.update(block)
                    out.write(block)
            if count < size:
                raise _RetryableError(f"truncated: {count} of the manifest's {size} bytes arrived")
            if digest.hexdigest() != sha256:
                raise _RetryableError(
                    f"sha256 {digest.hexdigest()} does not match the manifest's {sha256}; "
                    "republish the packed folder (or check what rewrites it in transit)"
                )
            os.replace(part, into)
        finally:
            Path(part).unlink(missing_ok=True)

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        if self.location.startswith("pipe:"):
            with _piped(self.location.removeprefix("pipe:"), name) as stream:
                yield stream
        elif self.location.startswith("s3://"):
            with _s3_object(self.location, name) as stream:
                yield stream
        else:
            with _http(self.url(name)) as stream:
                yield stream


def _check_name(name: str) -> None:
    if not NAME.match(name):  # a manifest from elsewhere names no path outside the dataset, and no option
        raise RemoteError(f"shard name {name!r} in the manifest is not a plain file name; repack the dataset")


def _read(stream: IO[bytes], n: int) -> bytes:
    try:
        return stream.read(n)
    except Exception as e:  # a reset connection, a timeout, an incomplete body; botocore's own types too
        raise _RetryableError(f"the transfer broke off ({type(e).__name__}: {e})") from None


def _read_all(stream: IO[bytes]) -> bytes:
    blocks = []
    while block := _read(stream, BLOCK):
        blocks.append(block)
    return b"".join(blocks)


# --- HTTP (the standard library's client: no curl, no shell) -----------------------------------


@contextmanager
def _http(url: str) -> Iterator[IO[bytes]]:
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 403:
            raise RemoteError(
                f"{url}: 403 Forbidden: the server refuses to serve it; check that the packed folder is "
                "published for reading (file permissions, the server's access rules)"
            ) from None
        if e.code == 404:
            raise RemoteError(
                f"{url}: 404 Not Found: check data.shards and that the whole packed folder was published "
                "(manifest.json and every shard)"
            ) from None
        if e.code >= 500 or e.code == 429:
            raise _RetryableError(f"HTTP {e.code} {e.reason}") from None
        raise RemoteError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out: maybe a restart
        raise _RetryableError(f"cannot connect ({getattr(e, 'reason', e)})") from None
    with response:
        yield response


# --- S3 (boto3: credentials and endpoint from the environment) ----------------------------------

_S3_CLIENTS: dict[int, Any] = {}  # per process: a loader worker forked with the parent's would share its sockets

_S3_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "403"}
_S3_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def _s3_client() -> Any:
    pid = os.getpid()
    if pid not in _S3_CLIENTS:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RemoteError("s3:// shards need boto3: pip install -e '.[s3]'") from None
        # botocore's own retries would hide a truncated body from ours; connect/read timeouts as for HTTP
        config = Config(retries={"max_attempts": 1}, connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
        _S3_CLIENTS.clear()
        _S3_CLIENTS[pid] = boto3.client("s3", config=config)
    return _S3_CLIENTS[pid]


@contextmanager
def _s3_object(location: str, name: str) -> Iterator[IO[bytes]]:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parts = urllib.parse.urlsplit(location)
    bucket, key = parts.netloc, f"{parts.path.strip('/')}/{name}".lstrip("/")
    url = f"s3://{bucket}/{key}"
    try:
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except NoCredentialsError:
        raise RemoteError(
            f"{url}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        ) from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _S3_DENIED:
            raise RemoteError(
                f"{url}: 403 {code}: check the credentials (AWS_ACCESS_KEY_ID or AWS_PROFILE), the endpoint "
                "(AWS_ENDPOINT_URL) and that they may read the bucket"
            ) from None
        if code in _S3_MISSING:
            raise RemoteError(
                f"{url}: 404 {code}: check data.shards (bucket and prefix), AWS_ENDPOINT_URL, and that the whole "
                "packed folder was published (manifest.json and every shard)"
            ) from None
        raise _RetryableError(f"S3 {code}") from None
    except BotoCoreError as e:  # endpoint unreachable, timeouts
        raise _RetryableError(f"cannot connect ({e})") from None
    try:
        yield body
    finally:
        body.close()


# --- pipe: (opted in; a program's standard output) ---------------------------------------------


@contextmanager
def _piped(template: str, name: str) -> Iterator[IO[bytes]]:
    # Split first, then put the name into the arguments: no shell ever parses the name.
    command = [arg.replace("{name}", name) for arg in shlex.split(template)]
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as e:
        raise RemoteError(f"pipe: {command[0]}: cannot run it ({e.strerror})") from None
    try:
        yield process.stdout
        process.stdout.close()
        if process.wait(timeout=TIMEOUT_S):
            raise _RetryableError(f"the command exited {process.returncode}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- local copies of remote shards --------------------------------------------------------------


@contextmanager
def local_copy(store: Store, name: str, size: int, sha256: str, cache: str | None) -> Iterator[Path]:
    """A verified local file of shard ``name``: in ``cache`` (kept, named by its sha256, so a
    republished dataset never reads a stale copy and two URLs of one dataset share it), or a
    temporary file removed after use."""
    if cache:
        kept = Path(cache) / f"{sha256}.tar"
        if not (kept.is_file() and kept.stat().st_size == size):  # written only whole and matching
            kept.parent.mkdir(parents=True, exist_ok=True)
            store.fetch(name, size, sha256, kept)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix="seg-shard-") as folder:
        path = Path(folder) / name
        store.fetch(name, size, sha256, path)
        yield path
