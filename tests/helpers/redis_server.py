"""A real Valkey/Redis server for the drift store tests: Debian's `redis-server` (or `valkey-server`) on a loopback
port in a temporary directory, with or without an append-only file, that a test can stop, kill and restart."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from oodserve.bench.http_driver import free_port


def server_binary() -> str | None:
    """The installed server (`make test` installs Debian's redis-server), or None."""
    return shutil.which("valkey-server") or shutil.which("redis-server")


class RedisServer:
    """redis-server on 127.0.0.1:`port`; `appendonly`: persist every write (appendfsync always) in `directory`."""

    def __init__(self, directory: Path, appendonly: bool, password: str | None = None) -> None:
        binary = server_binary()
        assert binary is not None, "no redis-server or valkey-server installed (make test installs redis-server)"
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def start(self) -> RedisServer:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--logfile", "server.log"]
        if self.password is not None:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            assert self.process.poll() is None, (self.directory / "server.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not answer within 20 s"
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: the server finishes its append-only file (when on) and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
