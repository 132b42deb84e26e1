"""The protocol layer: codecs decode what a client sends once into a typed request, routers send each
request type to one handler, and every handler gets the :class:`CallContext` of its call.

Modelled on arrow-go's ``flightsql`` server: a codec per wire format (JSON commands now, Flight SQL next),
one handler per request type, UNIMPLEMENTED for a request type nothing serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow.flight as flight
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from flight_lakehouse import flight_sql_pb2
from flight_lakehouse.access import middleware_of
from flight_lakehouse.audit import CallRecord
from flight_lakehouse.auth import Identity
from flight_lakehouse.commands import (
    Command,
    IngestCommand,
    ScanRequest,
    SearchCommand,
    SqlQuery,
    decode_json_object,
    parse_body,
    parse_model,
    validate_dataset_name,
)
from flight_lakehouse.errors import InvalidArgument, NotFound, Unimplemented

#: Type URL prefix of Flight SQL commands (protobuf ``Any``).
FLIGHT_SQL_TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
#: Every Flight SQL message by its type URL.
FLIGHT_SQL_MESSAGES: dict[str, type[Message]] = {
    FLIGHT_SQL_TYPE_PREFIX + name: getattr(flight_sql_pb2, name)
    for name in flight_sql_pb2.DESCRIPTOR.message_types_by_name
}

Role = Literal["reader", "writer", "admin"]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class CallContext:
    """What a handler knows of its call: the peer, cancellation, the caller (None: authentication is off)
    and the call's audit record (None: no audit log)."""

    peer: str
    is_cancelled: Callable[[], bool]
    caller: Identity | None = None
    record: CallRecord | None = None

    @classmethod
    def of(cls, context: flight.ServerCallContext) -> CallContext:
        """The context of one Flight call."""
        middleware = middleware_of(context)
        if middleware is None:
            return cls(peer=context.peer(), is_cancelled=context.is_cancelled)
        peer = context.peer()
        if middleware.record is not None:
            middleware.record.peer = peer
        return cls(peer, context.is_cancelled, middleware.identity, middleware.record)

    def note(
        self,
        call: str | None = None,
        dataset: str | None = None,
        rows: int | None = None,
        size: int | None = None,
    ) -> None:
        """Tell the audit log what the call is, which dataset it concerns, the rows and bytes it moved."""
        if self.record is not None:
            self.record.call = call or self.record.call
            self.record.note(dataset=dataset, rows=rows, size=size)


@dataclass(frozen=True)
class DatasetPath:
    """A path descriptor naming one dataset."""

    dataset: str


@dataclass(frozen=True)
class FlightSqlCommand:
    """A protobuf ``Any`` of a type the Flight SQL specification does not have (nothing serves it)."""

    type_url: str

    @property
    def unserved(self) -> str:
        """The UNIMPLEMENTED message naming it."""
        return f"Flight SQL command {self.type_url!r} is not served"


Request = SqlQuery | ScanRequest | IngestCommand | SearchCommand | DatasetPath | Message | FlightSqlCommand
#: The JSON commands by the name clients know them by.
REQUEST_NAMES: dict[type, str] = {
    SqlQuery: "sql",
    ScanRequest: "scan",
    IngestCommand: "ingest",
    SearchCommand: "search",
    DatasetPath: "path",
}


def is_flight_sql(raw: bytes) -> bool:
    """Whether ``raw`` looks like a serialised protobuf ``Any`` (field 1, the type URL, comes first);
    a JSON command starts with ``{`` or white space."""
    return raw[:1] == b"\n"


def decode_flight_sql(raw: bytes, expected: type[Message] | None = None) -> Message | FlightSqlCommand:
    """The Flight SQL codec: the message a protobuf ``Any`` holds, decoded once (``expected``: the one type
    allowed, as in an action body)."""
    packed = any_pb2.Any()
    try:
        packed.ParseFromString(raw)
    except DecodeError:
        raise InvalidArgument("malformed Flight SQL command: not a protobuf Any") from None
    kind = FLIGHT_SQL_MESSAGES.get(packed.type_url)
    if kind is None:
        return FlightSqlCommand(packed.type_url[:200])
    if expected is not None and kind is not expected:
        raise InvalidArgument(f"expected a Flight SQL {expected.__name__}, got {kind.__name__}")
    message = kind()
    try:
        message.ParseFromString(packed.value)
    except DecodeError:
        raise InvalidArgument(f"malformed Flight SQL {kind.__name__}") from None
    return message


def pack(message: Message) -> bytes:
    """``message`` as a serialised protobuf ``Any`` (Flight SQL commands, tickets and action results)."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed.SerializeToString()


class JsonCodec:
    """JSON commands, tickets and action bodies to the pydantic models of :mod:`commands`."""

    #: The key that tells each command apart, in the order they are tried.
    COMMANDS: ClassVar[tuple[tuple[str, type[Command]], ...]] = (
        ("sql", SqlQuery),
        ("ingest", IngestCommand),
        ("dataset", ScanRequest),
        ("search", SearchCommand),
    )

    def command(self, raw: bytes, what: str) -> Request:
        """A command or ticket: ``{"sql"}``, ``{"dataset"}`` (scan), ``{"search"}`` or ``{"ingest"}``."""
        if is_flight_sql(raw):
            return decode_flight_sql(raw)
        payload = decode_json_object(raw, what)
        for key, model in self.COMMANDS:
            if key in payload:
                return parse_model(model, payload)  # type: ignore[return-value]
        raise InvalidArgument(
            f"{what} must have one of the keys 'sql', 'dataset', 'search' or 'ingest'; got {sorted(payload)}"
        )

    def descriptor(self, descriptor: flight.FlightDescriptor, what: str) -> Request:
        """A path descriptor (one dataset) or a command descriptor."""
        if descriptor.descriptor_type != flight.DescriptorType.PATH:
            return self.command(descriptor.command, what)
        path = descriptor.path or []
        if len(path) != 1:
            raise InvalidArgument(f"a path descriptor names one dataset, got {len(path)} path elements")
        return DatasetPath(validate_dataset_name(path[0]))

    @staticmethod
    def ticket(request: Command) -> bytes:
        """The ticket that serves ``request`` by DoGet: the command itself, compact."""
        return request.model_dump_json(exclude_none=True).encode()

    @staticmethod
    def action_body(spec: ActionSpec, action: flight.Action) -> Command | Message | bytes:
        """The typed body of an action: JSON, a Flight SQL message packed in a protobuf ``Any``, or the raw
        bytes (a Flight RPC message such as ``CancelFlightInfoRequest``, decoded by its handler)."""
        raw = action.body.to_pybytes() if action.body else b""
        if spec.body is bytes:
            return raw
        if issubclass(spec.body, Message):
            return decode_flight_sql(raw, spec.body)
        return parse_body(spec.body, raw, f"{action.type} body")

    @staticmethod
    def result(value: Any) -> bytes:
        """A handler's result as compact UTF-8 JSON (bytes pass unchanged)."""
        if isinstance(value, bytes):
            return value
        return json.dumps(value, separators=(",", ":"), default=str).encode("utf-8")


class Router(Generic[H]):
    """One RPC's handlers by request type, each with the role it needs (``role`` unless the route says
    otherwise); a type it does not route is refused or UNIMPLEMENTED."""

    def __init__(self, rpc: str, role: Role = "reader") -> None:
        self.rpc = rpc
        self.role = role
        self._handlers: dict[type, H] = {}
        self._roles: dict[type, Role] = {}
        self._refusals: dict[type, str] = {}

    def route(self, kind: type, handler: H, role: Role | None = None) -> Router[H]:
        """Send requests of ``kind`` to ``handler`` (for callers whose role includes ``role``)."""
        self._handlers[kind] = handler
        self._roles[kind] = role or self.role
        return self

    def role_of(self, request: object) -> Role:
        """The role a request needs."""
        return self._roles.get(type(request), self.role)

    @staticmethod
    def call_name(request: object) -> str:
        """What a request is, for the audit log and refusals (``sql``, ``CommandStatementQuery``, ...)."""
        if isinstance(request, Message):
            return type(request).__name__
        return REQUEST_NAMES.get(type(request), type(request).__name__)

    def refuse(self, message: str, *kinds: type) -> Router[H]:
        """Answer requests of ``kinds`` (known, but not for this RPC) with INVALID_ARGUMENT ``message``."""
        self._refusals.update(dict.fromkeys(kinds, message))
        return self

    def handler(self, request: object) -> H:
        """The handler of ``request``."""
        kind = type(request)
        handler = self._handlers.get(kind)
        if handler is not None:
            return handler
        if kind in self._refusals:
            raise InvalidArgument(self._refusals[kind])
        if isinstance(request, FlightSqlCommand):
            raise Unimplemented(request.unserved)
        what = f"Flight SQL command {kind.__name__}" if isinstance(request, Message) else kind.__name__
        raise Unimplemented(f"{self.rpc} does not serve {what}")


@dataclass(frozen=True)
class ActionSpec:
    """One action: its body (a JSON model, a Flight SQL message or raw bytes), what it does, the role it
    needs (checked once auth lands), its handler."""

    body: type[Command] | type[Message] | type[bytes]
    description: str
    role: Role
    handler: Callable[[CallContext, Any], Any]


@dataclass
class ActionRouter:
    """The actions by name."""

    specs: dict[str, ActionSpec] = field(default_factory=dict)

    def spec(self, name: str) -> ActionSpec:
        """The action called ``name``."""
        spec = self.specs.get(name)
        if spec is None:
            raise NotFound(f"unknown action {name!r}; ListActions lists them")
        return spec

    def listing(self) -> list[tuple[str, str]]:
        """Every action's name and description."""
        return [(name, spec.description) for name, spec in self.specs.items()]
