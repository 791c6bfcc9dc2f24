"""A thin client for the destinations server: runs and sends in, statuses, attempt logs and
dead letters out. Standard library only (urllib); every call returns the server's JSON as
typed dictionaries, and every refusal raises :class:`DestinationsError` with the server's
``code``, ``message`` and, when a field is at fault, its path (``sends[1].payload.url``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterable, List, Literal, Optional, TypedDict, Union

__all__ = [
    "Attempt",
    "Client",
    "DeadLetter",
    "DeadLetterPage",
    "DestinationsError",
    "EventPage",
    "Replayed",
    "RunAccepted",
    "Send",
    "SendStatus",
    "State",
]

__version__ = "0.1.0"

State = Literal["queued", "in_flight", "delivered", "retrying", "dead"]


class Send(TypedDict):
    """One send of a run: the destination instance, and what its kind takes."""

    destination: str
    payload: Dict[str, Any]


class RunAccepted(TypedDict):
    run_id: str
    ids: List[str]


class Response(TypedDict, total=False):
    status: int
    elapsed_ms: int
    body_excerpt: str
    location: str


class Attempt(TypedDict, total=False):
    number: int
    started_at: str
    duration_ms: int
    outcome: Literal["delivered", "retry", "failed"]
    status_code: int
    response_excerpt: str
    error: str


class SendStatus(TypedDict, total=False):
    id: str
    destination: str
    run: str
    state: State
    attempts: int
    last_error: Optional[str]
    response: Response
    created_at: str
    updated_at: str
    next_attempt_at: str
    attempts_log: List[Attempt]


class EventPage(TypedDict):
    events: List[SendStatus]
    next: Optional[str]


class DeadLetter(TypedDict, total=False):
    id: str
    destination: str
    run: str
    attempts: int
    reason: str
    created_at: str
    died_at: str
    payload: Dict[str, Any]


class DeadLetterPage(TypedDict):
    dead_letters: List[DeadLetter]
    next: Optional[str]
    evicted: int


class Replayed(TypedDict):
    replayed: List[str]
    more: bool


class DestinationsError(Exception):
    """The server refused a request (or could not be reached: ``status`` 0, ``code``
    ``unreachable``)."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class Client:
    """The API of one server.

    >>> client = Client("http://127.0.0.1:8080", token=None)
    >>> accepted = client.run([{"destination": "http", "payload": {"url": "https://example.com/hook"}}])
    >>> client.status(accepted["ids"][0], wait="10s")["state"]
    'delivered'
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: Optional[str] = None,
                 timeout: float = 70.0):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:  # the token stays out of logs
        return f"Client({self.base_url!r})"

    # Sends in.

    def run(self, sends: Iterable[Send], run_id: Optional[str] = None,
            failed: bool = False) -> RunAccepted:
        """Send a run: every send is checked, then all are queued or none."""
        body: Dict[str, Any] = {"sends": list(sends)}
        if run_id is not None:
            body["run_id"] = run_id
        if failed:
            body["failed"] = True
        return self._call("POST", "/v1/runs", body=body)

    def send(self, destination: str, payload: Dict[str, Any]) -> str:
        """One send outside any run; its id."""
        return self._call("POST", f"/v1/send/{_segment(destination)}", body=payload)["id"]

    # Statuses out.

    def status(self, id: str, wait: Optional[str] = None) -> SendStatus:
        """A send's status with every attempt; with ``wait`` (``"10s"``, at most 60 s), once it
        is delivered or dead, or as it is when the wait ends."""
        return self._call("GET", f"/v1/events/{_segment(id)}", query={"wait": wait})

    def events(self, destination: Optional[str] = None, state: Optional[State] = None,
               run: Optional[str] = None, since: Optional[str] = None,
               until: Optional[str] = None, limit: Optional[int] = None,
               after: Optional[str] = None) -> EventPage:
        """The sends the server remembers, newest first; pass ``next`` as ``after`` for more."""
        return self._call("GET", "/v1/events", query={
            "destination": destination, "state": state, "run": run, "since": since,
            "until": until, "limit": limit, "after": after})

    def destinations(self) -> List[Dict[str, str]]:
        return self._call("GET", "/v1/destinations")["destinations"]

    # Dead letters.

    def dead_letters(self, destination: Optional[str] = None, since: Optional[str] = None,
                     until: Optional[str] = None, limit: Optional[int] = None,
                     after: Optional[str] = None) -> DeadLetterPage:
        return self._call("GET", "/v1/dead-letters", query={
            "destination": destination, "since": since, "until": until, "limit": limit,
            "after": after})

    def replay(self, ids: Optional[List[str]] = None, destination: Optional[str] = None,
               since: Optional[str] = None, until: Optional[str] = None,
               limit: Optional[int] = None) -> Replayed:
        """Queue dead letters again (all of them when nothing selects)."""
        body = {k: v for k, v in {"ids": ids, "destination": destination, "since": since,
                                   "until": until, "limit": limit}.items() if v is not None}
        return self._call("POST", "/v1/dead-letters/replay", body=body)

    # Endpoints.

    def endpoints(self) -> List[Dict[str, Any]]:
        return self._call("GET", "/v1/endpoints")["endpoints"]

    def pause(self, target: str) -> Dict[str, Any]:
        return self._call("POST", f"/v1/endpoints/{_segment(target)}/pause")

    def resume(self, target: str) -> Dict[str, Any]:
        return self._call("POST", f"/v1/endpoints/{_segment(target)}/resume")

    def _call(self, method: str, path: str, body: Any = None,
              query: Optional[Dict[str, Union[str, int, None]]] = None) -> Any:
        url = self.base_url + path
        if query:
            pairs = {k: str(v) for k, v in query.items() if v is not None}
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None or method == "POST":
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as refused:
            raise _error(refused.code, refused.read()) from None
        except (urllib.error.URLError, OSError) as unreachable:
            raise DestinationsError(0, "unreachable",
                                    f"{self.base_url} could not be reached: {unreachable}") from None


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _error(status: int, body: bytes) -> DestinationsError:
    try:
        error = json.loads(body)["error"]
        return DestinationsError(status, error["code"], error["message"], error.get("field"))
    except (ValueError, KeyError, TypeError):
        return DestinationsError(status, "unexpected",
                                 body.decode("utf-8", "replace")[:200] or "no body")
