"""A worker SDK for orchd, the offline-first job orchestrator, in one standard-library module.

Producers use :class:`Client` to enqueue jobs and read them back. Workers use :class:`Worker`,
which claims jobs in batches, runs a handler for each on a thread (up to ``concurrency`` at
once), heartbeats while the handler runs at the pace the daemon asks for, acknowledges success
with artifacts or reports a classified failure, backs off when there is no work or the daemon
pushes back, and shuts down gracefully on SIGTERM or SIGINT::

    import orch_worker

    def shout(ctx: orch_worker.JobContext) -> None:
        ctx.progress({"chars": len(ctx.payload["text"])})
        ctx.artifact("shout.txt", ctx.payload["text"].upper(), "text/plain")

    orch_worker.Worker(URL, TOKEN, queues=["shout"], handler=shout).run()

What a handler raises decides what happens to the job:

* :class:`Permanent` (or ``JobError(..., retryable=False)``) dead-letters it at once;
* :class:`Retryable` (or ``JobError(...)``) lets the daemon retry it with backoff;
* :class:`UpstreamThrottled` reports class ``http_429`` with the upstream's ``Retry-After``,
  which the daemon uses as the delay before the next attempt;
* any other exception is retryable with class ``exception.<TypeName>``.

Python 3.9 or later; nothing outside the standard library, so the module installs on an
air-gapped host as a plain file copy.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import signal
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

__all__ = [
    "ApiError",
    "Artifact",
    "Allocation",
    "Client",
    "Enqueued",
    "Failure",
    "JobContext",
    "JobError",
    "Permanent",
    "Retryable",
    "RunStats",
    "Unreachable",
    "UpstreamThrottled",
    "Worker",
    "failure_for",
    "parse_retry_after",
]

__version__ = "0.1.0"

API_PREFIX = "/api/v1"
"""Where the daemon's API lives under its base URL."""

SHUTDOWN_CLASS = "worker_shutdown"
"""The error class of jobs a stopping worker hands back unfinished."""

THROTTLED_CLASS = "http_429"
"""The error class of :class:`UpstreamThrottled`."""

ERROR_CLASS_MAX = 128
MESSAGE_MAX_BYTES = 4096
DEFAULT_MEDIA_TYPE = "application/octet-stream"

_ERROR_CLASS_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_NOT_CLASS_CHARS_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# Waits on the main thread are cut into slices this long, so a signal (which only sets a flag)
# is seen promptly; see Worker._on_signal.
_WAIT_SLICE_S = 0.1
# Backoff after a transient daemon error (429, 5xx, unreachable) without a Retry-After.
_ERROR_BACKOFF_MIN_S = 1.0
_ERROR_BACKOFF_MAX_S = 30.0
# Attempts at an ack or fail that meet transient errors before the lease is left to lapse.
_SETTLE_TRIES = 5

_LOG = logging.getLogger("orch_worker")

Handler = Callable[["JobContext"], Any]
"""A job handler: takes the job's context; returns ``None``, an :class:`Artifact` or a list of them."""


# --- Errors from the daemon ----------------------------------------------------------------------


class ApiError(Exception):
    """An error answer from orchd: the HTTP status and the envelope's stable ``code``.

    Branch on ``code`` (``not_found``, ``lease_lost``, ``invalid_request``, ``backpressure``…),
    never on ``message``. ``retry_after`` holds the ``Retry-After`` header in seconds, if any.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Optional[Mapping[str, Any]] = None,
        retry_after: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: Dict[str, Any] = dict(details or {})
        self.retry_after = retry_after
        self.request_id = request_id

    @property
    def transient(self) -> bool:
        """Worth trying again later: throttled (429), a server error (5xx), or no answer at all."""
        return self.status in (0, 408, 429) or self.status >= 500


class Unreachable(ApiError):
    """The daemon did not answer (connection refused or reset, timeout, DNS failure)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# --- Values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """An output of a job: stored by the daemon under ``name``, addressed by its SHA-256."""

    name: str
    content: bytes
    """The bytes (a str given here is stored as its UTF-8 encoding)."""
    media_type: str = DEFAULT_MEDIA_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.content, str):
            object.__setattr__(self, "content", self.content.encode("utf-8"))
        if not isinstance(self.content, (bytes, bytearray, memoryview)):
            raise TypeError(f"artifact {self.name!r}: content must be bytes or str")
        object.__setattr__(self, "content", bytes(self.content))
        if not self.name:
            raise ValueError("an artifact needs a non-empty name")

    @property
    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the content: what the daemon records for it."""
        return hashlib.sha256(self.content).hexdigest()

    def to_api(self) -> Dict[str, Any]:
        """The artifact as the ack body carries it."""
        return {
            "name": self.name,
            "media_type": self.media_type,
            "content_base64": base64.b64encode(self.content).decode("ascii"),
        }


class Enqueued(NamedTuple):
    """An enqueued job, and whether this call created it (``False``: the idempotency key was used)."""

    job: Dict[str, Any]
    created: bool


@dataclass(frozen=True)
class Allocation:
    """A leased job and what the daemon says about running it."""

    job: Dict[str, Any]
    lease_id: str
    lease_expires_at: str
    attempt: int
    idempotency_key: Optional[str]
    attempts_left: int
    retry_backoff_ms: int
    heartbeat_ms: int

    @classmethod
    def from_api(cls, a: Mapping[str, Any]) -> Allocation:
        """Reads one entry of a claim answer's ``allocations``."""
        return cls(
            job=dict(a["job"]),
            lease_id=str(a["lease_id"]),
            lease_expires_at=str(a.get("lease_expires_at", "")),
            attempt=int(a.get("attempt", a["job"].get("attempt", 1))),
            idempotency_key=a.get("idempotency_key"),
            attempts_left=int(a.get("attempts_left", 0)),
            retry_backoff_ms=int(a.get("retry_backoff_ms", 0)),
            heartbeat_ms=int(a["heartbeat_ms"]),
        )

    @property
    def job_id(self) -> int:
        return int(self.job["id"])

    @property
    def queue(self) -> str:
        return str(self.job["spec"]["queue"])


@dataclass
class RunStats:
    """What one :meth:`Worker.run` did, counted per attempt (a job retried twice counts twice)."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    released: int = 0
    """Handed back unfinished at shutdown (failed with class ``worker_shutdown``)."""
    dropped: int = 0
    """Results thrown away because the lease was lost (cancelled, expired, or refused)."""

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


# --- The HTTP client -------------------------------------------------------------------------------


def _rfc3339(t: Union[str, datetime]) -> str:
    if isinstance(t, str):
        return t
    if t.tzinfo is None:
        raise ValueError("run_after must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _job_body(queue: str, payload: Any = None, **fields: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"queue": queue}
    if payload is not None:
        body["payload"] = payload
    for k, v in fields.items():
        if v is None:
            continue
        body[k] = _rfc3339(v) if k == "run_after" else v
    return body


class Client:
    """The daemon's job API over HTTP with a bearer token. Safe to share between threads.

    Every method raises :class:`ApiError` for an error answer and :class:`Unreachable` when the
    daemon does not answer. ``tenant`` names the tenant to act for with a site-wide token.
    Proxies come from the usual environment variables (``http_proxy``, ``no_proxy``).
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0, tenant: Optional[str] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": f"orch-worker-python/{__version__}",
        }
        if tenant:
            self._headers["Orch-Tenant"] = tenant

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Sends one request to ``base_url + /api/v1 + path`` and returns the decoded JSON answer."""
        url = f"{self.base_url}{API_PREFIX}{path}"
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise _error_from_answer(e) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"{method} {url}: {reason}") from e
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(502, "bad_response", f"{method} {url}: the answer is not JSON: {e}") from None

    # Producers.

    def enqueue(
        self,
        queue: str,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        correlation_id: Optional[str] = None,
        run_after: Union[str, datetime, None] = None,
        depends_on: Optional[Sequence[int]] = None,
        project: Optional[str] = None,
    ) -> Enqueued:
        """Enqueues one job. With an ``idempotency_key`` already used, returns that job, ``created=False``."""
        body = _job_body(
            queue,
            payload,
            source=source,
            priority=priority,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            run_after=run_after,
            depends_on=list(depends_on) if depends_on is not None else None,
            project=project,
        )
        out = self.request("POST", "/jobs", body)
        return Enqueued(out["job"], bool(out["created"]))

    def enqueue_batch(self, jobs: Iterable[Mapping[str, Any]]) -> List[Enqueued]:
        """Enqueues 1 to 1000 jobs in one transaction (all or nothing), in order.

        Each job is a mapping with the fields of :meth:`enqueue`: ``{"queue": "q", "payload": {...}}``.
        """
        bodies = [_job_body(**dict(j)) for j in jobs]
        out = self.request("POST", "/jobs/batch", {"jobs": bodies})
        return [Enqueued(i["job"], bool(i["created"])) for i in out["items"]]

    def get_job(self, job_id: int) -> Dict[str, Any]:
        """One job, as the daemon knows it now."""
        return _job_of(self.request("GET", f"/jobs/{int(job_id)}"))

    # Workers (the Worker class drives these; they are public for workers with their own loop).

    def claim(
        self, worker_id: str, queues: Sequence[str], limit: int = 1, lease_seconds: Optional[int] = None
    ) -> List[Allocation]:
        """Leases up to ``limit`` (1-1000) ready jobs of the given queues; possibly none."""
        body: Dict[str, Any] = {"worker_id": worker_id, "queues": list(queues), "limit": int(limit)}
        if lease_seconds is not None:
            body["lease_seconds"] = int(lease_seconds)
        out = self.request("POST", "/claims", body)
        return [Allocation.from_api(a) for a in out.get("allocations", [])]

    def heartbeat(
        self, job_id: int, lease_id: str, progress: Any = None, extend_seconds: Optional[int] = None
    ) -> Dict[str, Any]:
        """Extends a lease (by ``extend_seconds``, or the daemon's default) and records progress."""
        body: Dict[str, Any] = {"lease_id": lease_id}
        if progress is not None:
            body["progress"] = progress
        if extend_seconds is not None:
            body["extend_seconds"] = int(extend_seconds)
        return _job_of(self.request("POST", f"/jobs/{int(job_id)}/heartbeat", body))

    def ack(self, job_id: int, lease_id: str, artifacts: Iterable[Artifact] = ()) -> Dict[str, Any]:
        """Completes a leased job with its artifacts."""
        body = {"lease_id": lease_id, "artifacts": [a.to_api() for a in artifacts]}
        return _job_of(self.request("POST", f"/jobs/{int(job_id)}/ack", body))

    def fail(
        self,
        job_id: int,
        lease_id: str,
        error_class: str,
        message: str = "",
        retryable: bool = True,
        retry_after_seconds: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Reports a failed attempt; the job is queued again (``retryable``, attempts left) or dead."""
        body: Dict[str, Any] = {
            "lease_id": lease_id,
            "error_class": error_class,
            "message": message,
            "retryable": bool(retryable),
        }
        if retry_after_seconds is not None:
            body["retry_after_seconds"] = int(retry_after_seconds)
        return _job_of(self.request("POST", f"/jobs/{int(job_id)}/fail", body))


def _job_of(answer: Any) -> Dict[str, Any]:
    return dict(answer["job"])


def _error_from_answer(e: urllib.error.HTTPError) -> ApiError:
    try:
        raw = e.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    retry_after = parse_retry_after(e.headers.get("Retry-After") if e.headers else None)
    try:
        err = json.loads(raw)["error"]
        return ApiError(
            e.code,
            str(err.get("code", "error")),
            str(err.get("message", "")),
            err.get("details") if isinstance(err.get("details"), dict) else {},
            retry_after,
            err.get("request_id") or None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()[:200]
        return ApiError(e.code, "http_error", text or str(e.reason), {}, retry_after)


# --- What handlers raise ---------------------------------------------------------------------------


class JobError(Exception):
    """Fails the attempt with a chosen error class (1-128 characters of ``A-Za-z0-9-_.:``).

    ``retryable=False`` dead-letters the job at once; ``retry_after`` (seconds) asks the daemon
    for the delay before the next attempt instead of its own backoff.
    """

    def __init__(
        self, error_class: str, message: str = "", retryable: bool = True, retry_after: Optional[float] = None
    ) -> None:
        if not _ERROR_CLASS_RE.match(error_class):
            raise ValueError(f"error class {error_class!r} must be 1-128 characters of A-Za-z0-9-_.:")
        super().__init__(message or error_class)
        self.error_class = error_class
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class Retryable(JobError):
    """A failure worth another attempt, after the daemon's backoff or ``retry_after`` seconds."""

    def __init__(self, message: str = "", error_class: str = "retryable", retry_after: Optional[float] = None) -> None:
        super().__init__(error_class, message, True, retry_after)


class Permanent(JobError):
    """A failure no retry can fix (bad input, a missing record): the job is dead-lettered at once."""

    def __init__(self, message: str = "", error_class: str = "permanent") -> None:
        super().__init__(error_class, message, False)


class UpstreamThrottled(JobError):
    """The upstream answered 429: class ``http_429``, retried after its ``Retry-After``.

    The daemon adds up to 10 % jitter to the delay, so workers told the same instant spread out.
    Without ``retry_after_seconds`` the daemon's own backoff applies.
    """

    def __init__(self, retry_after_seconds: Optional[float] = None, message: str = "") -> None:
        if not message:
            message = "upstream throttled (429)"
            if retry_after_seconds is not None:
                message += f"; Retry-After {retry_after_seconds:g} s"
        super().__init__(THROTTLED_CLASS, message, True, retry_after_seconds)
        self.retry_after_seconds = retry_after_seconds

    @classmethod
    def from_header(cls, retry_after: Optional[str], message: str = "") -> UpstreamThrottled:
        """From the upstream's raw ``Retry-After`` header (seconds or an HTTP date)."""
        return cls(parse_retry_after(retry_after), message)


class Failure(NamedTuple):
    """A failed attempt as the fail call reports it."""

    error_class: str
    message: str
    retryable: bool
    retry_after_seconds: Optional[int]


def failure_for(exc: BaseException) -> Failure:
    """Maps what a handler raised to the failure reported to the daemon."""
    if isinstance(exc, JobError):
        retry_after = None
        if exc.retry_after is not None:
            retry_after = max(0, int(math.ceil(exc.retry_after)))
        return Failure(exc.error_class, _clean_message(exc.message), exc.retryable, retry_after)
    name = _NOT_CLASS_CHARS_RE.sub("_", type(exc).__name__) or "Exception"
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return Failure(f"exception.{name}"[:ERROR_CLASS_MAX], _clean_message(message), True, None)


def _clean_message(s: str) -> str:
    """What the daemon accepts as a message: at most 4096 bytes, no control characters but \\n and \\t."""
    s = _CONTROL_RE.sub(" ", s)
    raw = s.encode("utf-8")
    if len(raw) <= MESSAGE_MAX_BYTES:
        return s
    return raw[: MESSAGE_MAX_BYTES - 3].decode("utf-8", "ignore") + "..."


# --- Running handlers ------------------------------------------------------------------------------


class JobContext:
    """What a handler gets: the job, a way to report progress, and a place to put artifacts."""

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot
        self._artifacts: List[Artifact] = []

    @property
    def allocation(self) -> Allocation:
        return self._slot.alloc

    @property
    def job(self) -> Dict[str, Any]:
        """The job as claimed (``id``, ``spec``, ``attempt``, ``correlation_id``…)."""
        return self._slot.alloc.job

    @property
    def job_id(self) -> int:
        return self._slot.alloc.job_id

    @property
    def queue(self) -> str:
        return self._slot.alloc.queue

    @property
    def payload(self) -> Any:
        return self._slot.alloc.job["spec"].get("payload")

    @property
    def attempt(self) -> int:
        """This attempt's number, 1 for the first."""
        return self._slot.alloc.attempt

    @property
    def attempts_left(self) -> int:
        """Attempts left after this one: 0 means a failure now dead-letters the job."""
        return self._slot.alloc.attempts_left

    @property
    def idempotency_key(self) -> Optional[str]:
        """The job's idempotency key, to make the handler's own side effects idempotent."""
        return self._slot.alloc.idempotency_key

    @property
    def lease_lost(self) -> bool:
        """True once the lease is gone (job cancelled, lease expired, or released at shutdown).

        The result will be thrown away; a long handler can check this and return early.
        """
        return self._slot.lost.is_set() or self._slot.released

    @property
    def stopping(self) -> bool:
        """True once the worker is shutting down: a cooperative handler may wind up."""
        return self._slot.worker_stopping.is_set()

    def progress(self, value: Any, now: bool = False) -> None:
        """Records progress (any JSON value): sent with the next heartbeat, or at once with ``now``."""
        with self._slot.progress_lock:
            self._slot.pending_progress = value
        if now:
            self._slot.send_heartbeat()

    def artifact(self, name: str, content: Union[bytes, str], media_type: str = DEFAULT_MEDIA_TYPE) -> str:
        """Adds an output, sent with the ack; returns its SHA-256 (lowercase hex), as the daemon records it."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        a = Artifact(name, data, media_type)
        self._artifacts.append(a)
        return a.sha256


_RUNNING, _SETTLING, _RELEASED = "running", "settling", "released"


class _Slot:
    """One allocation being worked: its handler thread, its heartbeats and its fate."""

    def __init__(
        self, alloc: Allocation, client: Client, extend_seconds: Optional[int], worker_stopping: threading.Event
    ) -> None:
        self.alloc = alloc
        self.client = client
        self.extend_seconds = extend_seconds
        self.worker_stopping = worker_stopping
        self.state = _RUNNING
        self.state_lock = threading.Lock()
        self.finished = threading.Event()  # stops the heartbeats
        self.lost = threading.Event()
        self.send_lock = threading.Lock()  # one heartbeat, ack or fail at a time for this lease
        self.progress_lock = threading.Lock()
        self.pending_progress: Any = None

    @property
    def released(self) -> bool:
        return self.state == _RELEASED

    def begin(self, new_state: str) -> bool:
        """Moves from running to settling or released; False if another path got there first."""
        with self.state_lock:
            if self.state != _RUNNING:
                return False
            self.state = new_state
            return True

    def heartbeat_loop(self) -> None:
        interval = max(self.alloc.heartbeat_ms, 50) / 1000.0
        wait = interval
        while not self.finished.wait(wait):
            # After a transient failure, try again sooner: the lease is still running out.
            wait = interval if self.send_heartbeat() else min(interval, 1.0) / 2

    def send_heartbeat(self) -> bool:
        """Sends one heartbeat with any pending progress; False after a transient failure."""
        with self.send_lock:
            if self.lost.is_set() or self.released:
                return True
            with self.progress_lock:
                progress, self.pending_progress = self.pending_progress, None
            try:
                self.client.heartbeat(self.alloc.job_id, self.alloc.lease_id, progress, self.extend_seconds)
                return True
            except ApiError as e:
                if e.transient:
                    with self.progress_lock:
                        if self.pending_progress is None:
                            self.pending_progress = progress
                    _LOG.warning("job %s: heartbeat failed, will try again: %s", self.alloc.job_id, e)
                    return False
                self.lost.set()
                self.finished.set()
                _LOG.warning("job %s: lease lost (%s); its result will be dropped", self.alloc.job_id, e)
                return True

    def has_pending_progress(self) -> bool:
        with self.progress_lock:
            return self.pending_progress is not None


def _as_artifacts(returned: Any) -> List[Artifact]:
    if returned is None:
        return []
    if isinstance(returned, Artifact):
        return [returned]
    if isinstance(returned, (list, tuple)) and all(isinstance(a, Artifact) for a in returned):
        return list(returned)
    raise TypeError(f"a handler returns None, an Artifact or a list of Artifacts, not {type(returned).__name__}")


def _jittered(seconds: float, spread: float = 0.2) -> float:
    return max(0.0, seconds * random.uniform(1.0 - spread, 1.0 + spread))


class Worker:
    """Claims jobs from ``queues`` and runs them with ``handler`` (or ``handlers[queue]``).

    * Claims in batches of up to ``batch`` (default ``concurrency``), never more than free slots,
      and runs up to ``concurrency`` handlers at once on threads.
    * Heartbeats every allocation's ``heartbeat_ms`` (a third of the lease) while its handler runs;
      the lease length is the daemon's unless ``lease_seconds`` is given.
    * When a claim finds nothing, sleeps ``poll_interval`` (±20 % jitter), doubling up to
      ``max_poll_interval`` while the queues stay empty. After a 429 or 5xx from the daemon, or
      no answer, waits its ``Retry-After`` or an exponential backoff.
    * On :meth:`stop` (or SIGTERM/SIGINT under :meth:`run`) stops claiming, gives running handlers
      ``shutdown_grace`` seconds, then releases the unfinished jobs (see :meth:`run`).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        worker_id: Optional[str] = None,
        queues: Optional[Sequence[str]] = None,
        handler: Optional[Handler] = None,
        *,
        handlers: Optional[Mapping[str, Handler]] = None,
        concurrency: int = 1,
        batch: Optional[int] = None,
        lease_seconds: Optional[int] = None,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        shutdown_grace: float = 30.0,
        client: Optional[Client] = None,
    ) -> None:
        self.handlers: Dict[str, Handler] = dict(handlers or {})
        self.queues: List[str] = list(queues if queues is not None else self.handlers)
        if not self.queues:
            raise ValueError("a worker needs at least one queue")
        for q in self.queues:
            if q not in self.handlers:
                if handler is None:
                    raise ValueError(f"no handler for queue {q!r}")
                self.handlers[q] = handler
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.batch = max(1, min(batch if batch is not None else concurrency, 1000))
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.max_poll_interval = max(poll_interval, max_poll_interval)
        self.shutdown_grace = shutdown_grace
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.client = client or Client(base_url, token)
        self.stats = RunStats()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._signals = 0  # bumped by the signal handler, which must not take locks
        self._cond = threading.Condition()
        self._active: Dict[int, _Slot] = {}

    # Control.

    def stop(self) -> None:
        """Asks the worker to stop (from any thread); a second call skips the grace period."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only a counter: a lock taken here could be the one the interrupted code holds.
        self._signals += 1

    def _check_signals(self) -> None:
        if self._signals and not self._stop.is_set():
            _LOG.info("worker %s: signal received, stopping (grace %s s)", self.worker_id, self.shutdown_grace)
            self.stop()
        if self._signals > 1:
            self._hurry.set()

    def _sleep(self, seconds: float) -> None:
        """Sleeps on the main thread, waking early on stop."""
        end = time.monotonic() + seconds
        while True:
            self._check_signals()
            left = end - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return
            self._stop.wait(min(left, _WAIT_SLICE_S))

    # The loop.

    def run(
        self, *, until_idle: bool = False, max_jobs: Optional[int] = None, install_signals: bool = True
    ) -> RunStats:
        """Works the queues until stopped; returns what it did.

        ``until_idle`` returns once a claim finds nothing ready and no handler is running (jobs
        waiting for a retry time do not count). ``max_jobs`` returns after that many allocations
        (attempts) have been claimed and settled. SIGTERM and SIGINT stop the worker when
        ``install_signals`` is set and this is the main thread; a second signal skips the grace.

        At shutdown, a job whose handler has not finished within ``shutdown_grace`` is released:
        failed as retryable with class ``worker_shutdown`` and ``retry_after_seconds=0``, so
        another worker can claim it at once instead of waiting for the lease to lapse. That
        uses up the attempt (a job on its last attempt is dead-lettered, visibly so), and the
        abandoned handler's result, should it still come, is dropped. A lease the daemon
        already took back (an error other than 429/5xx on the heartbeat) is never acked.

        A configuration error from the daemon (401, 403, 422 on the claim) is raised after the
        running handlers have been given their grace.
        """
        restore = self._install_signals() if install_signals else {}
        try:
            self._loop(until_idle, max_jobs)
        finally:
            try:
                self._shutdown()
            finally:
                for sig, previous in restore.items():
                    signal.signal(sig, previous)
        return self.stats

    def _install_signals(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: Dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _loop(self, until_idle: bool, max_jobs: Optional[int]) -> None:
        idle_delay = self.poll_interval
        error_delay = _ERROR_BACKOFF_MIN_S
        while True:
            self._check_signals()
            if self._stop.is_set():
                return
            room = self._wait_for_room()
            if room == 0:
                continue
            if max_jobs is not None:
                if self.stats.claimed >= max_jobs:
                    self._wait_until_idle()
                    return
                room = min(room, max_jobs - self.stats.claimed)
            try:
                allocs = self.client.claim(self.worker_id, self.queues, min(room, self.batch), self.lease_seconds)
            except ApiError as e:
                if not e.transient:
                    raise
                if e.retry_after is not None:
                    delay = e.retry_after
                else:
                    delay = _jittered(error_delay)
                    error_delay = min(error_delay * 2, _ERROR_BACKOFF_MAX_S)
                _LOG.warning("worker %s: claim failed, retrying in %.1f s: %s", self.worker_id, delay, e)
                self._sleep(delay)
                continue
            error_delay = _ERROR_BACKOFF_MIN_S
            if not allocs:
                if until_idle and self._running() == 0:
                    return
                self._sleep(_jittered(idle_delay))
                idle_delay = min(idle_delay * 2, self.max_poll_interval)
                continue
            idle_delay = self.poll_interval
            for alloc in allocs:
                self._start(alloc)

    def _running(self) -> int:
        with self._cond:
            return len(self._active)

    def _wait_for_room(self) -> int:
        with self._cond:
            while len(self._active) >= self.concurrency and not self._stop.is_set():
                self._cond.wait(_WAIT_SLICE_S)
                self._check_signals()
            return 0 if self._stop.is_set() else self.concurrency - len(self._active)

    def _wait_until_idle(self) -> None:
        with self._cond:
            while self._active and not self._stop.is_set():
                self._cond.wait(_WAIT_SLICE_S)
                self._check_signals()

    def _start(self, alloc: Allocation) -> None:
        slot = _Slot(alloc, self.client, self.lease_seconds, self._stop)
        with self._cond:
            self._active[id(slot)] = slot
            self.stats.claimed += 1
        # Daemon threads: a handler that never returns must not keep the process alive after
        # its job has been released at shutdown.
        name = f"orch-job-{alloc.job_id}"
        threading.Thread(target=self._work, args=(slot,), name=name, daemon=True).start()

    def _count(self, slot: _Slot, outcome: str) -> None:
        with self._cond:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self._active.pop(id(slot), None)
            self._cond.notify_all()

    def _work(self, slot: _Slot) -> None:
        outcome = "dropped"
        try:
            outcome = self._execute(slot)
        except Exception:  # a bug here must not leave the slot taken forever
            _LOG.exception("job %s: unexpected error in the worker", slot.alloc.job_id)
        finally:
            if outcome != _RELEASED:
                self._count(slot, outcome)

    def _execute(self, slot: _Slot) -> str:
        alloc = slot.alloc
        ctx = JobContext(slot)
        beat = threading.Thread(target=slot.heartbeat_loop, name=f"orch-heartbeat-{alloc.job_id}", daemon=True)
        beat.start()
        failure: Optional[Failure] = None
        artifacts: List[Artifact] = []
        try:
            returned = self.handlers[alloc.queue](ctx)
            artifacts = ctx._artifacts + _as_artifacts(returned)
            names = [a.name for a in artifacts]
            if len(set(names)) != len(names):
                raise ValueError(f"artifact names must be unique: {names}")
        except BaseException as exc:  # noqa: B036 — every outcome must reach the daemon
            failure = failure_for(exc)
            if isinstance(exc, JobError):
                _LOG.info("job %s attempt %s: %s: %s", alloc.job_id, alloc.attempt, failure.error_class, exc)
            else:
                _LOG.warning(
                    "job %s attempt %s failed:\n%s", alloc.job_id, alloc.attempt, traceback.format_exc().rstrip()
                )
        if not slot.begin(_SETTLING):
            _LOG.info("job %s: handler finished after the job was released; result dropped", alloc.job_id)
            return _RELEASED
        slot.finished.set()
        beat.join()
        if slot.lost.is_set():
            return "dropped"
        if failure is None:
            if slot.has_pending_progress():
                slot.send_heartbeat()
                if slot.lost.is_set():
                    return "dropped"
            return self._ack(slot, artifacts)
        return self._fail(slot, failure)

    def _settle(self, slot: _Slot, what: str, call: Callable[[], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Runs an ack or fail, retrying transient errors; None if the lease is gone."""
        delay = 0.5
        for attempt in range(1, _SETTLE_TRIES + 1):
            try:
                with slot.send_lock:
                    return call()
            except ApiError as e:
                if not e.transient:
                    raise
                if attempt == _SETTLE_TRIES:
                    job_id = slot.alloc.job_id
                    _LOG.error("job %s: %s failed %d times, leaving the lease to lapse: %s", job_id, what, attempt, e)
                    return None
                wait = e.retry_after if e.retry_after is not None else _jittered(delay)
                _LOG.warning("job %s: %s failed, retrying in %.1f s: %s", slot.alloc.job_id, what, wait, e)
                time.sleep(wait)
                delay *= 2
        return None

    def _ack(self, slot: _Slot, artifacts: List[Artifact]) -> str:
        alloc = slot.alloc
        try:
            job = self._settle(slot, "ack", lambda: self.client.ack(alloc.job_id, alloc.lease_id, artifacts))
        except ApiError as e:
            if e.status in (404, 409):
                _LOG.warning("job %s: ack refused, lease lost: %s", alloc.job_id, e)
                return "dropped"
            # The daemon refuses the result itself (too large, a bad name): retrying the same
            # handler would produce it again, so the attempt fails for good.
            _LOG.error("job %s: ack rejected: %s", alloc.job_id, e)
            return self._fail(slot, Failure("ack_rejected", _clean_message(f"ack rejected: {e}"), False, None))
        if job is None:
            return "dropped"
        recorded = {a.get("name"): a.get("sha256") for a in job.get("artifacts", [])}
        for a in artifacts:
            if recorded.get(a.name) != a.sha256:
                _LOG.error(
                    "job %s: artifact %r recorded with sha256 %s, sent %s",
                    alloc.job_id,
                    a.name,
                    recorded.get(a.name),
                    a.sha256,
                )
        return "succeeded"

    def _fail(self, slot: _Slot, f: Failure) -> str:
        alloc = slot.alloc
        try:
            job = self._settle(
                slot,
                "fail",
                lambda: self.client.fail(
                    alloc.job_id, alloc.lease_id, f.error_class, f.message, f.retryable, f.retry_after_seconds
                ),
            )
        except ApiError as e:
            _LOG.warning("job %s: fail refused (lease lost?): %s", alloc.job_id, e)
            return "dropped"
        return "failed" if job is not None else "dropped"

    # Shutdown.

    def _shutdown(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + self.shutdown_grace
        with self._cond:
            while self._active and time.monotonic() < deadline and not self._hurry.is_set():
                self._cond.wait(_WAIT_SLICE_S)
                self._check_signals()
            leftover = list(self._active.values())
        for slot in leftover:
            self._release(slot)
        # Slots that were settling (an ack in flight) finish on their own; give them a moment.
        settle_deadline = time.monotonic() + 10.0
        with self._cond:
            while self._active and time.monotonic() < settle_deadline:
                self._cond.wait(_WAIT_SLICE_S)

    def _release(self, slot: _Slot) -> None:
        if not slot.begin(_RELEASED):
            return  # the handler finished meanwhile; its ack or fail is on its way
        slot.finished.set()
        alloc = slot.alloc
        message = f"worker {self.worker_id} stopped before the handler finished (grace {self.shutdown_grace:g} s)"
        outcome = "released"
        try:
            with slot.send_lock:
                self.client.fail(alloc.job_id, alloc.lease_id, SHUTDOWN_CLASS, message, True, 0)
            _LOG.info("job %s: released for another worker", alloc.job_id)
        except ApiError as e:
            outcome = "dropped"
            _LOG.warning("job %s: could not release it (its lease will lapse): %s", alloc.job_id, e)
        self._count(slot, outcome)
