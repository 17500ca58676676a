"""HBONE: sans-IO HTTP/2 CONNECT client and server over h2, authority parsing and the H2 guard limits.

Nothing in this package does I/O: it takes bytes and events in and gives bytes and events out.
"""

from __future__ import annotations

from ztunnel.hbone.authority import Authority, AuthorityError, parse_authority
from ztunnel.hbone.connection import HboneClientConnection, HboneConnection, HboneServerConnection
from ztunnel.hbone.errors import ErrorCodes, HboneError, StreamClosedError, TooManyStreamsError
from ztunnel.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelEstablished,
    TunnelRejected,
    TunnelRequested,
    TunnelRequestInvalid,
    WindowUpdated,
)
from ztunnel.hbone.guard import DEFAULT_LIMITS, Guard, GuardTrip, Limits
from ztunnel.hbone.settings import CLIENT_SETTINGS, SERVER_SETTINGS, H2Settings

__all__ = [
    "CLIENT_SETTINGS",
    "DEFAULT_LIMITS",
    "SERVER_SETTINGS",
    "Authority",
    "AuthorityError",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCodes",
    "Event",
    "GoAwayReceived",
    "Guard",
    "GuardTrip",
    "H2Settings",
    "HboneClientConnection",
    "HboneConnection",
    "HboneError",
    "HboneServerConnection",
    "Limits",
    "StreamClosedError",
    "StreamEnded",
    "StreamReset",
    "TooManyStreamsError",
    "TunnelEstablished",
    "TunnelRejected",
    "TunnelRequestInvalid",
    "TunnelRequested",
    "WindowUpdated",
    "parse_authority",
]
