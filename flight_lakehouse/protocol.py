"""The protocol layer: codecs decode what a client sends once into a typed request, routers send each
request type to one handler, and every handler gets the :class:`CallContext` of its call.

Modelled on arrow-go's ``flightsql`` server: a codec per wire format (JSON commands now, Flight SQL next),
one handler per request type, UNIMPLEMENTED for a request type nothing serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow.flight as flight

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
FLIGHT_SQL_TYPE_PREFIX = b"type.googleapis.com/arrow.flight.protocol.sql."
TYPE_URL = re.compile(rb"type\.googleapis\.com/[A-Za-z0-9_.]+")

Role = Literal["reader", "writer", "admin"]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class CallContext:
    """What a handler knows of its caller: the peer and cancellation (identity and role come with auth)."""

    peer: str
    is_cancelled: Callable[[], bool]
    identity: str | None = None
    role: Role | None = None

    @classmethod
    def of(cls, context: flight.ServerCallContext) -> CallContext:
        """The context of one Flight call."""
        return cls(peer=context.peer(), is_cancelled=context.is_cancelled)


@dataclass(frozen=True)
class DatasetPath:
    """A path descriptor naming one dataset."""

    dataset: str


@dataclass(frozen=True)
class FlightSqlCommand:
    """A Flight SQL command (protobuf ``Any``); no handler serves it yet."""

    type_url: str
    unserved: ClassVar[str] = "Flight SQL commands are not served yet; use JSON commands"


Request = SqlQuery | ScanRequest | IngestCommand | SearchCommand | DatasetPath | FlightSqlCommand


def is_flight_sql(raw: bytes) -> bool:
    """Whether ``raw`` is a serialised protobuf ``Any`` holding a Flight SQL command."""
    return raw.startswith(b"\n") and FLIGHT_SQL_TYPE_PREFIX in raw[:200]


def decode_flight_sql(raw: bytes) -> FlightSqlCommand:
    """The Flight SQL codec, for now only naming the command's type."""
    found = TYPE_URL.search(raw[:200])
    return FlightSqlCommand(found.group().decode() if found else "")


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
    def action_body(spec: ActionSpec, action: flight.Action) -> Command:
        """The typed body of an action."""
        return parse_body(spec.body, action.body.to_pybytes() if action.body else b"", f"{action.type} body")

    @staticmethod
    def result(value: Any) -> bytes:
        """A handler's result as compact UTF-8 JSON (bytes pass unchanged)."""
        if isinstance(value, bytes):
            return value
        return json.dumps(value, separators=(",", ":"), default=str).encode("utf-8")


class Router(Generic[H]):
    """One RPC's handlers by request type; a type it does not route is refused or UNIMPLEMENTED."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self._handlers: dict[type, H] = {}
        self._refusals: dict[type, str] = {}

    def route(self, kind: type, handler: H) -> Router[H]:
        """Send requests of ``kind`` to ``handler``."""
        self._handlers[kind] = handler
        return self

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
        raise Unimplemented(getattr(kind, "unserved", f"{self.rpc} does not serve {kind.__name__}"))


@dataclass(frozen=True)
class ActionSpec:
    """One action: its body model, what it does, the role it needs (checked once auth lands), its handler."""

    body: type[Command]
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
