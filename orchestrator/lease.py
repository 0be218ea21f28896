"""One driver per sweep: the lease `<results>/<sweep>/_driver`.

A driver (`ccn run`, also the one a `ccn submit` job runs) holds the lease of its sweep while it
schedules, cleans up and writes; a second driver of the same sweep on the same results refuses
at once (LeaseHeld, one line naming the holder and how to take over). The lease is a small JSON
document: host, pid, start time, heartbeat (seconds since the epoch), expiry and a random token.
The holder refreshes the heartbeat from a background thread every expiry / 4 seconds and deletes
the lease at the end. A lease whose heartbeat is older than its expiry belongs to a dead driver:
`--takeover` replaces it (and only then); before that it is refused too. A lease left by a dead
driver of this machine (same host, kernel boot and PID namespace; its pid gone or reused) is
taken over at once, with a warning line: rerunning a crashed `ccn run` needs no flag. When the
holder cannot keep its lease (writes fail for half the expiry, or it was taken over) it stops.

How the lease is created exclusively, by results store:

- a file system (local, NFS, a mounted bucket): `open(O_CREAT | O_EXCL)`; refreshes write a
  temporary file and rename it over the lease after checking the token is still ours.
- S3 (and S3-compatible stores with conditional writes: AWS since 2024, MinIO, moto), when boto3
  is installed: `PutObject` with `If-None-Match: *` creates it, `If-Match: <ETag>` refreshes it
  and takes over a stale one, so two drivers can never both hold it.
- any other pyarrow file system (or S3 without boto3), the documented fallback: check that no
  lease exists, write ours, wait `CCN_LEASE_SETTLE` seconds (default 2), read it back: the
  driver whose token is there holds it, the other refuses. Safe as long as both writes land
  within the settle time (object stores are read-after-write consistent).

Expiry: `CCN_LEASE_EXPIRY` seconds (default 60), or `expiry=`. Heartbeats compare the holder's
clock with the taker's: keep the drivers' clocks in sync (NTP) or the expiry well above the skew.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

LEASE_NAME = "_driver"  # readers skip names starting with "_"
DEFAULT_EXPIRY = 60.0
EXPIRY_ENV = "CCN_LEASE_EXPIRY"
SETTLE_ENV = "CCN_LEASE_SETTLE"


class LeaseHeld(RuntimeError):
    """Another driver holds the sweep's lease (a message for people)."""


class LeaseLost(RuntimeError):
    """This driver could not keep its lease (the results became unwritable, or it was taken over)."""


class _Conflict(Exception):
    """A conditional write found the lease changed (someone else created or replaced it)."""


def default_expiry() -> float:
    text = os.environ.get(EXPIRY_ENV)
    if not text:
        return DEFAULT_EXPIRY
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${EXPIRY_ENV}={text!r}: must be a number of seconds") from None
    if value <= 0:
        raise ValueError(f"${EXPIRY_ENV}={text!r}: must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class Holder:
    """What a lease says about its driver."""

    host: str
    pid: int
    started: float
    heartbeat: float
    expiry: float
    token: str
    machine: str = ""  # this_machine() of the holder: its pid can be checked from the same machine

    def dead_here(self) -> bool:
        """Whether the holder is a process of this machine (same kernel and PID namespace) that no
        longer exists: then its lease is taken over at once, without waiting for the expiry."""
        if not self.machine or self.machine != this_machine() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _process_start(self.pid) not in (None, self.process_start)

    process_start: str | None = None  # the holder's start time in clock ticks (guards against PID reuse)

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return (time.time() if now is None else now) - self.heartbeat

    def expired(self, now: float | None = None) -> bool:
        return self.age(now) > self.expiry

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host} pid {self.pid} (since {started}, heartbeat {self.age():.0f}s ago)"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def decode(data: bytes) -> Holder | None:
        """None for an unreadable lease (a torn write): treated as expired."""
        try:
            fields = json.loads(data)
            return Holder(
                host=str(fields["host"]),
                pid=int(fields["pid"]),
                started=float(fields["started"]),
                heartbeat=float(fields["heartbeat"]),
                expiry=float(fields["expiry"]),
                token=str(fields["token"]),
                machine=str(fields.get("machine", "")),
                process_start=fields.get("process_start"),
            )
        except (ValueError, KeyError, TypeError):
            return None


def this_machine() -> str:
    """Host name, kernel boot and PID namespace: where a lease's pid means the same process."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(open("/proc/sys/kernel/random/boot_id").read().strip())  # noqa: SIM115
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), if known."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# -- backends: create exclusively, read, replace conditionally, delete -------------------------


class _LocalBackend:
    """A POSIX file system: O_EXCL creates, a checked rename replaces."""

    kind = "O_EXCL file"

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return data, data.decode(errors="replace")  # the content is its own version tag

    def create(self, data: bytes) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise _Conflict from None
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def replace(self, data: bytes, version: str) -> None:
        current = self.read()
        if current is None or current[1] != version:
            raise _Conflict
        temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            os.unlink(self.path)


class _S3Backend:
    """S3 conditional writes through boto3: If-None-Match creates, If-Match replaces."""

    kind = "S3 conditional put"

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key

    def _conflict(self, error) -> bool:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self) -> tuple[bytes, str] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return answer["Body"].read(), answer["ETag"]

    def _put(self, data: bytes, **condition) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as error:
            if self._conflict(error):
                raise _Conflict from None
            raise

    def create(self, data: bytes) -> None:
        self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> None:
        self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _SettleBackend:
    """Any pyarrow file system without conditional writes: write, settle, read back (best effort)."""

    kind = "write, settle and read back (no conditional writes)"

    def __init__(self, filesystem: pafs.FileSystem, path: str, settle: float):
        self.filesystem, self.path, self.settle = filesystem, path, settle

    def read(self) -> tuple[bytes, str] | None:
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            if self.filesystem.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise
        return data, data.decode(errors="replace")

    def _write_and_check(self, data: bytes) -> None:
        self.filesystem.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)
        time.sleep(self.settle)
        current = self.read()
        if current is None or current[0] != data:
            raise _Conflict

    def create(self, data: bytes) -> None:
        if self.read() is not None:
            raise _Conflict
        self._write_and_check(data)

    def replace(self, data: bytes, version: str) -> None:
        current = self.read()
        if current is None or current[1] != version:
            raise _Conflict
        with self.filesystem.open_output_stream(self.path) as stream:  # a refresh: no settle
            stream.write(data)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.filesystem.delete_file(self.path)


def _s3_client(root: str):
    """A boto3 S3 client configured like pyarrow's for this root (query options, then $AWS_*)."""
    import boto3  # noqa: PLC0415 - optional: only for S3 results
    from botocore.config import Config

    query = {name: values[-1] for name, values in parse_qs(urlparse(root).query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    options = {"endpoint_url": endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")}
    if query.get("region"):
        options["region_name"] = query["region"]
    if query.get("access_key") and query.get("secret_key"):
        options["aws_access_key_id"], options["aws_secret_access_key"] = query["access_key"], query["secret_key"]
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=30)
    return boto3.client("s3", config=config, **{k: v for k, v in options.items() if v})


def backend_for(root: str, filesystem: pafs.FileSystem, path: str):
    """The exclusive-create backend of a results store (see the module docstring)."""
    if filesystem.type_name == "local":
        return _LocalBackend(path)
    if filesystem.type_name == "s3":
        try:
            client = _s3_client(root)
        except ImportError:
            client = None
        if client is not None:
            bucket, _, key = path.partition("/")
            return _S3Backend(client, bucket, key)
    return _SettleBackend(filesystem, path, float(os.environ.get(SETTLE_ENV, "2")))


# -- the lease -------------------------------------------------------------------------------


class Lease:
    """The lease of one sweep's results: acquire, keep alive (heartbeat thread), release."""

    def __init__(self, store, *, expiry: float | None = None, retry_hint: str = "ccn run SPEC --takeover"):
        self.path = f"{store.base}/{LEASE_NAME}"
        self.where = f"{store.root.rstrip('/')}/{store.sweep}/{LEASE_NAME}"
        self.backend = backend_for(store.root, store.filesystem, self.path)
        self.expiry = default_expiry() if expiry is None else float(expiry)
        self.retry_hint = retry_hint
        self.holder: Holder | None = None
        self.version: str | None = None
        self.lost: str | None = None  # why the lease was lost (None while held)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._written: Holder | None = None  # the holder last written by acquire, confirmed or not

    def current(self) -> Holder | None:
        """The lease's holder as stored now (None when there is no lease)."""
        found = self.backend.read()
        if found is None:
            return None
        return Holder.decode(found[0]) or Holder("?", 0, 0.0, 0.0, 0.0, "unreadable")

    def _new_holder(self) -> Holder:
        now, pid = time.time(), os.getpid()
        return Holder(
            socket.gethostname(), pid, now, now, self.expiry, uuid.uuid4().hex, this_machine(), _process_start(pid)
        )

    def _refused(self, holder: Holder, takeover: bool) -> LeaseHeld:
        if takeover:
            wait = max(0.0, holder.expiry - holder.age())
            return LeaseHeld(
                f"the sweep's lease {self.where} is held by {holder.describe()}; --takeover is allowed once its "
                f"heartbeat is older than {holder.expiry:.0f}s (in {wait:.0f}s), i.e. once that driver is dead"
            )
        return LeaseHeld(
            f"another driver runs this sweep on these results: {holder.describe()}, lease {self.where}; "
            f"wait for it, or if it is dead take over with `{self.retry_hint}` once its heartbeat is older "
            f"than {holder.expiry:.0f}s"
        )

    def acquire(self, takeover: bool = False) -> Lease:
        """Create the lease exclusively (or replace a stale one with `takeover`); LeaseHeld otherwise."""
        for _ in range(3):  # a lease that vanishes between our create and read: try again
            mine = self._written = self._new_holder()
            try:
                self.backend.create(mine.encode())
            except _Conflict:
                pass
            else:
                self._held(mine)
                return self
            found = self.backend.read()
            if found is None:
                continue
            data, version = found
            holder = Holder.decode(data)
            dead = holder is not None and holder.dead_here()
            if holder is not None and not dead and (not takeover or not holder.expired()):
                raise self._refused(holder, takeover)
            if holder is None and not takeover:  # a torn lease: only --takeover replaces it
                raise LeaseHeld(f"the sweep's lease {self.where} cannot be read; replace it with `{self.retry_hint}`")
            try:
                self.backend.replace(mine.encode(), version)
            except _Conflict:  # another driver took over first
                current = self.current()
                if current is not None:
                    raise self._refused(current, False) from None
                continue
            self._held(mine)
            if holder is not None:
                from orchestrator.results import warn

                warn(f"took over the lease {self.where} from " + ("the dead " if dead else "")
                     + f"driver {holder.describe()}")
            return self
        raise LeaseHeld(f"the sweep's lease {self.where} keeps changing; is another driver starting?")

    def _held(self, holder: Holder) -> None:
        found = self.backend.read()
        if found is None or Holder.decode(found[0]) != holder:
            raise LeaseHeld(f"the sweep's lease {self.where} changed while it was being taken; try again")
        self.holder, self.version, self.lost = holder, found[1], None

    def refresh(self) -> None:
        """Write a new heartbeat; LeaseLost when the lease is no longer ours."""
        with self._lock:
            if self.holder is None:
                raise LeaseLost("the lease is not held")
            renewed = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                self.backend.replace(renewed.encode(), self.version)
            except _Conflict:
                current = self.current()
                raise LeaseLost(
                    f"the lease {self.where} was taken over by "
                    + (current.describe() if current else "someone who then released it")
                ) from None
            found = self.backend.read()
            if found is None or Holder.decode(found[0]) != renewed:
                raise LeaseLost(f"the lease {self.where} changed under this driver")
            self.holder, self.version = renewed, found[1]

    def verify(self) -> bool:
        """One heartbeat now; False (and `lost` says why) when the lease cannot be written."""
        if self.lost:
            return False
        try:
            self.refresh()
        except LeaseLost as error:
            self.lost = str(error)
        except Exception as error:  # noqa: BLE001 - e.g. a read-only file system
            self.lost = f"cannot refresh the lease {self.where}: {' '.join(str(error).split())}"
        return self.lost is None

    def keep_alive(self, interrupt_main: bool = False) -> None:
        """Refresh the heartbeat every expiry / 4 seconds from a daemon thread until `release`.

        When the lease cannot be kept (writes fail for half the expiry, or it was taken over)
        `lost` says why and, with interrupt_main, the main thread gets a KeyboardInterrupt so the
        driver stops writing (the caller turns it into LeaseLost).
        """
        interval = self.expiry / 4

        def beat():
            last_ok = time.monotonic()
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                    last_ok = time.monotonic()
                    continue
                except LeaseLost as error:
                    self.lost = str(error)
                except Exception as error:  # noqa: BLE001 - a failed write: retry until half the expiry
                    if time.monotonic() - last_ok < self.expiry / 2:
                        continue
                    self.lost = f"cannot refresh the lease {self.where}: {' '.join(str(error).split())}"
                if interrupt_main and not self._stop.is_set():
                    _thread.interrupt_main()
                return

        self._thread = threading.Thread(target=beat, name="ccn-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours, also one that `acquire` wrote
        but was stopped before confirming (never raises but KeyboardInterrupt; safe to repeat)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self.lost:
                return
            if self.holder is None and self._written is None:
                return
            try:
                version = self.version
                if self.holder is None:  # not confirmed: acquire stopped (Ctrl-C) after writing, or failed
                    found = self.backend.read()
                    if found is None or Holder.decode(found[0]) != self._written:
                        self._written = None
                        return
                    version = found[1]
                self.backend.delete(version)
            except Exception as error:  # noqa: BLE001 - the sweep's outcome matters more
                from orchestrator.results import warn

                warn(f"cannot delete the lease {self.where}: {' '.join(str(error).split())}; "
                     f"the next run may need --takeover once it is older than {self.expiry:.0f}s")
            self.holder = self._written = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
