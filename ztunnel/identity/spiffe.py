"""SPIFFE workload identities in Istio's form: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Parsing is strict: exactly the five path segments Istio accepts, no empty parts, no percent-encoding,
no whitespace, NUL or other control characters, lower-case scheme, and a trust domain made only of
the characters the SPIFFE specification allows. Everything else is rejected with an error that says
which part is wrong. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
# SPIFFE spec: trust domain is lower-case letters, digits, '.', '-', '_'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
# Kubernetes namespaces are DNS-1123 labels; service accounts are DNS-1123 subdomains.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
MAX_LENGTH = 2048  # SPIFFE ID length limit from the specification


class SpiffeIdError(ValueError):
    """A string is not a valid Istio SPIFFE identity; the message says which part and why."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """One workload identity: a service account in a namespace of a trust domain."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check_part("trust domain", self.trust_domain, _TRUST_DOMAIN, 255)
        _check_part("namespace", self.namespace, _NAMESPACE, 63)
        _check_part("service account", self.service_account, _SERVICE_ACCOUNT, 253)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/NS/sa/SA``; raise SpiffeIdError naming the offending part."""
        if not isinstance(uri, str):
            raise SpiffeIdError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        if len(uri) > MAX_LENGTH:
            raise SpiffeIdError(
                f"SPIFFE ID is {len(uri)} characters long, the limit is {MAX_LENGTH}"
            )
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
            raise SpiffeIdError(f"SPIFFE ID {uri!r} contains whitespace or control characters")
        if not uri.startswith(SCHEME):
            raise SpiffeIdError(f"SPIFFE ID {uri!r} must start with {SCHEME!r}")
        segments = uri[len(SCHEME) :].split("/")
        if len(segments) != 5:
            raise SpiffeIdError(
                f"SPIFFE ID {uri!r} must have the form spiffe://<trust-domain>/ns/<namespace>/sa/"
                f"<service-account> (found {len(segments)} path segments, expected 5)"
            )
        trust_domain, ns_key, namespace, sa_key, service_account = segments
        if ns_key != "ns":
            raise SpiffeIdError(f"SPIFFE ID {uri!r}: second segment must be 'ns', found {ns_key!r}")
        if sa_key != "sa":
            raise SpiffeIdError(f"SPIFFE ID {uri!r}: fourth segment must be 'sa', found {sa_key!r}")
        try:
            return cls(trust_domain, namespace, service_account)
        except SpiffeIdError as err:
            raise SpiffeIdError(f"SPIFFE ID {uri!r}: {err}") from None

    @property
    def principal(self) -> str:
        """The identity without the scheme (``td/ns/NS/sa/SA``): what Istio policies match against."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.principal}"

    def __str__(self) -> str:
        return self.uri


def _check_part(what: str, value: str, pattern: re.Pattern[str], limit: int) -> None:
    if not value:
        raise SpiffeIdError(f"{what} is empty")
    if len(value) > limit:
        raise SpiffeIdError(f"{what} {value!r} is longer than {limit} characters")
    if "%" in value:
        raise SpiffeIdError(
            f"{what} {value!r} is percent-encoded; SPIFFE IDs are compared literally"
        )
    if pattern.fullmatch(value) is None:
        raise SpiffeIdError(
            f"{what} {value!r} has characters that are not allowed "
            "(lower-case letters, digits, '-', '.', and '_' in trust domains only)"
        )
