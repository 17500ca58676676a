"""Normalisation: unit cases, Hypothesis idempotence, and the L7 bypass corpus against an oracle.

The corpus (reliability.md "Waypoint L7 normalisation corpus") feeds raw requests through
`normalize_request` + `authz.evaluate` and compares the decision with an independent, naive
oracle: a separately written normaliser (regex + posixpath) followed by plain string checks.
"""

from __future__ import annotations

import posixpath
import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.waypoint.proxy.helpers import dest
from waypoint.proxy.authz import AuthzContext, WaypointScope, evaluate, parse_authorization_policies
from waypoint.proxy.normalize import (
    EscapedSlashes,
    NormalizationOptions,
    RequestRejectedError,
    normalize_authority,
    normalize_path,
    normalize_request,
)
from waypoint.proxy.request import RawRequest

REJECT = "400"

# --- the independent oracle ------------------------------------------------------------------

_UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def oracle_path(target: str) -> str:
    path = target.split("#")[0].split("?")[0]
    if any(not 0x21 <= ord(c) <= 0x7E for c in path):
        return REJECT
    if re.search(r"%(?![0-9A-Fa-f]{2})", path) or re.search(r"%(2f|5c)", path, re.IGNORECASE):
        return REJECT

    def unescape(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    path = re.sub(r"%([0-9A-Fa-f]{2})", unescape, path).replace("\\", "/")
    if not path.startswith("/"):
        return REJECT
    path = re.sub("/+", "/", path)
    directory = path.endswith(("/", "/.", "/.."))
    norm = posixpath.normpath(path)
    if directory and norm != "/":
        norm += "/"
    return norm


def oracle_host(value: str) -> str:
    host = (
        value.lower().rsplit(":", 1)[0]
        if not value.startswith("[")
        else value.lower().split("]")[0] + "]"
    )
    return host.rstrip(".")


def oracle_decision(method: str, host: str, path: str) -> str:
    if path == "/admin" or path.startswith("/admin/"):
        return "deny"
    if method == "DELETE" or host == "internal.example":
        return "deny"
    return "allow"


POLICIES, _errors = parse_authorization_policies(
    [
        {
            "metadata": {"name": "guard", "namespace": "ns"},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                "action": "DENY",
                "rules": [
                    {"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]},
                    {"to": [{"operation": {"methods": ["DELETE"]}}]},
                    {"to": [{"operation": {"hosts": ["internal.example"]}}]},
                ],
            },
        }
    ]
)
assert not _errors
SCOPE = WaypointScope(namespace="ns", name="waypoint")
DEST = dest("echo", 80, namespace="ns")

# (method, target, Host header(s), :authority, expected canonical path or REJECT)
CORPUS: list[tuple[str, str, tuple[str, ...], str | None, str]] = [
    ("GET", "/admin", ("echo",), None, "/admin"),
    ("GET", "/admin/", ("echo",), None, "/admin/"),
    ("GET", "/admin/users", ("echo",), None, "/admin/users"),
    ("GET", "/public", ("echo",), None, "/public"),
    ("GET", "/administrator", ("echo",), None, "/administrator"),
    ("GET", "//admin", ("echo",), None, "/admin"),
    ("GET", "///admin//users", ("echo",), None, "/admin/users"),
    ("GET", "/public//../admin", ("echo",), None, "/admin"),
    ("GET", "/./admin", ("echo",), None, "/admin"),
    ("GET", "/public/./../admin/x", ("echo",), None, "/admin/x"),
    ("GET", "/public/../admin", ("echo",), None, "/admin"),
    ("GET", "/../admin", ("echo",), None, "/admin"),
    ("GET", "/../../../../admin", ("echo",), None, "/admin"),
    ("GET", "/a/b/../../admin/", ("echo",), None, "/admin/"),
    ("GET", "/admin/..", ("echo",), None, "/"),
    ("GET", "/admin/.", ("echo",), None, "/admin/"),
    ("GET", "/admin/x/..", ("echo",), None, "/admin/"),
    ("GET", "/%61dmin", ("echo",), None, "/admin"),
    ("GET", "/%41dmin", ("echo",), None, "/Admin"),
    ("GET", "/ad%6Din/x", ("echo",), None, "/admin/x"),
    ("GET", "/ad%6din/x", ("echo",), None, "/admin/x"),
    ("GET", "/%2e%2e/admin", ("echo",), None, "/admin"),
    ("GET", "/public/%2e%2e/admin", ("echo",), None, "/admin"),
    ("GET", "/public/%2E%2E/admin", ("echo",), None, "/admin"),
    ("GET", "/public/.%2e/admin", ("echo",), None, "/admin"),
    ("GET", "/%2e/admin", ("echo",), None, "/admin"),
    ("GET", "/admin%2Fusers", ("echo",), None, REJECT),
    ("GET", "/admin%2fusers", ("echo",), None, REJECT),
    ("GET", "/public%2F..%2Fadmin", ("echo",), None, REJECT),
    ("GET", "/admin%5Cusers", ("echo",), None, REJECT),
    ("GET", "/admin%5cusers", ("echo",), None, REJECT),
    ("GET", "/public\\..\\admin", ("echo",), None, "/admin"),
    ("GET", "\\admin", ("echo",), None, "/admin"),
    ("GET", "/admin\\users", ("echo",), None, "/admin/users"),
    ("GET", "/admin#fragment", ("echo",), None, "/admin"),
    ("GET", "/public#/../admin", ("echo",), None, "/public"),
    ("GET", "/admin?x=/public", ("echo",), None, "/admin"),
    ("GET", "/public?/../admin", ("echo",), None, "/public"),
    ("GET", "/admin%252Fusers", ("echo",), None, "/admin%252Fusers"),
    ("GET", "/%2561dmin", ("echo",), None, "/%2561dmin"),
    ("GET", "/a%20b", ("echo",), None, "/a%20b"),
    ("GET", "/a%7eb", ("echo",), None, "/a~b"),
    ("GET", "/a%3fb", ("echo",), None, "/a%3Fb"),
    ("GET", "/a%00b", ("echo",), None, "/a%00b"),
    ("GET", "/adm%in", ("echo",), None, REJECT),
    ("GET", "/admin%", ("echo",), None, REJECT),
    ("GET", "/admin%2", ("echo",), None, REJECT),
    ("GET", "/admin%zz", ("echo",), None, REJECT),
    ("GET", "/ad min", ("echo",), None, REJECT),
    ("GET", "/admin\x00", ("echo",), None, REJECT),
    ("GET", "/admin\t", ("echo",), None, REJECT),
    ("GET", "/adm\u00efn", ("echo",), None, REJECT),
    ("GET", "admin", ("echo",), None, REJECT),
    ("GET", "*", ("echo",), None, REJECT),
    ("get", "/public", ("echo",), None, "/public"),
    ("delete", "/public", ("echo",), None, "/public"),
    ("DeLeTe", "/public", ("echo",), None, "/public"),
    ("DELETE", "/public", ("echo",), None, "/public"),
    ("GE T", "/public", ("echo",), None, REJECT),
    ("GET\r\n", "/public", ("echo",), None, REJECT),
    ("", "/public", ("echo",), None, REJECT),
    ("G(T", "/public", ("echo",), None, REJECT),
    ("GET", "/public", ("Internal.Example",), None, "/public"),
    ("GET", "/public", ("INTERNAL.EXAMPLE.",), None, "/public"),
    ("GET", "/public", ("internal.example:8080",), None, "/public"),
    ("GET", "/public", ("echo", "internal.example"), None, REJECT),
    ("GET", "/public", ("echo", "echo"), None, REJECT),
    ("GET", "/public", ("echo",), "internal.example", REJECT),
    ("GET", "/public", ("internal.example",), "internal.example", "/public"),
    ("GET", "/public", ("internal.example",), "INTERNAL.example:80", REJECT),
    ("GET", "/public", (), "internal.example", "/public"),
    ("GET", "/public", (), None, REJECT),
    ("GET", "/public", ("user@internal.example",), None, REJECT),
    ("GET", "/public", ("internal.example:99999",), None, REJECT),
    ("GET", "/public", ("internal.example:+80",), None, REJECT),
    ("GET", "/public", ("internal example",), None, REJECT),
    ("GET", "/public", ("[::1]:8080",), None, "/public"),
    ("GET", "/public", ("[::1",), None, REJECT),
    ("GET", "/public", ("internal..example",), None, REJECT),
]


def _ours(method, target, hosts, authority) -> tuple[str, str]:
    raw = RawRequest(
        method=method, target=target, authority=authority, headers=[("Host", h) for h in hosts]
    )
    try:
        request = normalize_request(raw, DEST)
    except RequestRejectedError:
        return REJECT, REJECT
    decision = evaluate(POLICIES, AuthzContext(request=request), SCOPE)
    return request.path, "allow" if decision.allowed else "deny"


def _oracle(method, target, hosts, authority) -> tuple[str, str]:
    path = oracle_path(target)
    values = [*hosts, *([authority] if authority is not None else [])]
    if (
        path == REJECT
        or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", method)
        or len(hosts) > 1
        or not values
        or len(
            {
                oracle_host(v) + ":" + (v.rsplit(":", 1)[1] if ":" in v.split("]")[-1] else "")
                for v in values
            }
        )
        > 1
        or not all(
            re.fullmatch(r"([a-z0-9_.-]+|\[[0-9a-f:]+\])(:[0-9]{1,5})?", v.lower())
            and ".." not in v
            for v in values
        )
        or any(":" in v.split("]")[-1] and int(v.rsplit(":", 1)[1]) > 65535 for v in values)
    ):
        return REJECT, REJECT
    return path, oracle_decision(method.upper(), oracle_host(values[0]), path)


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 60


@pytest.mark.parametrize(
    ("method", "target", "hosts", "authority", "expected"),
    CORPUS,
    ids=[repr(c[:4]) for c in CORPUS],
)
def test_corpus_matches_oracle(method, target, hosts, authority, expected):
    ours = _ours(method, target, hosts, authority)
    assert ours[0] == expected
    assert ours == _oracle(method, target, hosts, authority)


# --- unit cases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "path", "expected"),
    [
        ("BASE", "/a//b", "/a//b"),
        ("BASE", "/a%2Fb", "/a%2Fb"),
        ("BASE", "/a/../b", "/b"),
        ("MERGE_SLASHES", "/a//b", "/a/b"),
        ("MERGE_SLASHES", "/a%2fb", "/a%2Fb"),
        ("DECODE_AND_MERGE_SLASHES", "/a%2Fb", "/a/b"),
        ("DECODE_AND_MERGE_SLASHES", "/a%2F%2Fb", "/a/b"),
        ("DECODE_AND_MERGE_SLASHES", "/a%5C..%5Cb", "/b"),
        ("DECODE_AND_MERGE_SLASHES", "/public%2F..%2Fadmin", "/admin"),
    ],
)
def test_istio_modes(mode, path, expected):
    assert normalize_path(path, NormalizationOptions.from_istio(mode)) == expected


def test_unknown_istio_mode_is_an_error():
    with pytest.raises(ValueError, match="NONE"):
        NormalizationOptions.from_istio("NONE")


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("Echo.NS.svc.cluster.local.", ("echo.ns.svc.cluster.local", None)),
        ("echo:8080", ("echo", 8080)),
        ("[FE80::1]:443", ("[fe80::1]", 443)),
        ("10.0.0.1", ("10.0.0.1", None)),
    ],
)
def test_authority(authority, expected):
    assert normalize_authority(authority) == expected


@pytest.mark.parametrize(
    "authority", ["", "a" * 300, "echo:0", "echo:", "[zz]", "[::1]x", "ec%68o", "echo:8a"]
)
def test_bad_authority(authority):
    with pytest.raises(RequestRejectedError):
        normalize_authority(authority)


def test_header_value_with_nul_is_rejected():
    with pytest.raises(RequestRejectedError, match="NUL"):
        normalize_request(
            RawRequest(method="GET", target="/", headers=[("host", "a"), ("x", "a\x00b")]), DEST
        )


def test_bytes_headers_are_decoded():
    r = normalize_request(
        RawRequest(method="GET", target="/", headers=[(b"Host", b"A"), (b"X-Y", b"z")]), DEST
    )
    assert (r.host, r.headers) == ("a", (("x-y", "z"),))


# --- properties ---------------------------------------------------------------------------------

PATH_ALPHABET = st.sampled_from(
    [
        "/",
        "//",
        ".",
        "..",
        "a",
        "B",
        "%2e",
        "%2E",
        "%41",
        "%2f",
        "%5c",
        "%25",
        "%7e",
        "\\",
        "%3F",
        "~",
        "-",
        "%zz",
        "%",
    ]
)
MODES = [
    NormalizationOptions(),
    NormalizationOptions.from_istio("BASE"),
    NormalizationOptions.from_istio("MERGE_SLASHES"),
    NormalizationOptions.from_istio("DECODE_AND_MERGE_SLASHES"),
]


@given(parts=st.lists(PATH_ALPHABET, max_size=20), mode=st.sampled_from(MODES))
def test_normalize_path_is_idempotent(parts, mode):
    path = "/" + "".join(parts)
    try:
        once = normalize_path(path, mode)
    except RequestRejectedError:
        return
    assert normalize_path(once, mode) == once
    assert once.startswith("/")
    assert "/../" not in once
    assert "/./" not in once
    if mode.merge_slashes:
        assert "//" not in once


@given(parts=st.lists(PATH_ALPHABET, max_size=20))
def test_default_mode_agrees_with_oracle(parts):
    path = "/" + "".join(parts)
    try:
        ours = normalize_path(path)
    except RequestRejectedError:
        ours = REJECT
    assert ours == oracle_path(path)


@given(st.text(max_size=200))
def test_normalize_request_never_crashes(target):
    try:
        normalize_request(RawRequest(method="GET", target=target, headers=[("host", "a")]), DEST)
    except RequestRejectedError:
        pass


def test_escaped_slash_keep_is_stable():
    options = NormalizationOptions(escaped_slashes=EscapedSlashes.KEEP)
    assert normalize_path("/a%2fb/%2E%2E/c", options) == "/c"
    assert normalize_path("/a%2fb/../c", options) == "/c"
