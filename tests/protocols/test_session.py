"""The sans-IO client core: ACK/NACK decisions, known versions, node identity, backoff."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from tests.protocols.helpers import Recorder, node, workload
from ztunnel.xds import protos
from ztunnel.xds.session import Backoff, DeltaSession, NodeInfo, is_benign_close

ADDR = protos.ADDRESS_TYPE_URL
AUTHZ = protos.AUTHORIZATION_TYPE_URL


def resource(name: str, msg, version: str = "v1", type_url: str = ADDR) -> protos.Resource:
    return protos.Resource(
        name=name,
        version=version,
        resource=any_pb2.Any(type_url=type_url, value=msg.SerializeToString()),
    )


def push(*resources, removed=(), nonce="n1", type_url=ADDR) -> protos.DeltaDiscoveryResponse:
    return protos.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, resources=resources, removed_resources=removed
    )


def session(rec: Recorder | None = None) -> tuple[DeltaSession, Recorder]:
    rec = rec or Recorder()
    return DeltaSession(node().to_proto(), protos.ZTUNNEL_TYPE_URLS, rec), rec


def test_initial_requests_are_wildcard_with_node_and_known_versions():
    s, _ = session()
    first = s.initial_requests()
    assert [r.type_url for r in first] == [ADDR, AUTHZ]
    for r in first:
        assert not r.resource_names_subscribe
        assert not r.resource_names_unsubscribe
        assert (
            r.node.id == "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        )
        assert not r.initial_resource_versions
        assert not r.response_nonce
    s.on_response(push(resource(*workload("a", "10.0.0.5"))))
    again = s.initial_requests()
    assert dict(again[0].initial_resource_versions) == {"Kubernetes//Pod/default/a": "v1"}


def test_ack_and_readiness_needs_every_type():
    s, _ = session()
    ack = s.on_response(push(nonce="7"))
    assert ack.response_nonce == "7"
    assert not ack.HasField("error_detail")
    assert not s.ready
    s.on_response(push(nonce="8", type_url=AUTHZ))
    assert s.ready


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            protos.Resource(
                name="x", version="1", resource=any_pb2.Any(type_url=ADDR, value=b"\xff\xff")
            ),
            "x: cannot decode istio.workload.Address",
        ),
        (
            protos.Resource(name="x", version="1", resource=any_pb2.Any(type_url=AUTHZ)),
            "x: resource type 'type.googleapis.com/istio.security.Authorization' does not match",
        ),
        (
            protos.Resource(version="1", resource=any_pb2.Any(type_url=ADDR)),
            "<resource #1 without name>: resource has no name",
        ),
    ],
    ids=["undecodable", "wrong-type", "no-name"],
)
def test_malformed_resources_are_nacked_good_ones_applied(bad, reason):
    s, rec = session()
    good = resource(*workload("a", "10.0.0.5"))
    nack = s.on_response(push(good, bad, nonce="n9"))
    assert nack.response_nonce == "n9"
    assert nack.error_detail.message.startswith(reason)
    assert nack.error_detail.code == 3
    assert set(s.known_versions(ADDR)) == {"Kubernetes//Pod/default/a"}
    assert rec.names(ADDR) == {"Kubernetes//Pod/default/a"}


def test_rejected_resource_keeps_last_good_version():
    rec = Recorder(reject=lambda _n, msg: "no IP" if not msg.workload.addresses else None)
    s, _ = session(rec)
    uid, msg = workload("a", "10.0.0.5")
    s.on_response(push(resource(uid, msg, "v1")))
    broken = protos.Address()
    broken.CopyFrom(msg)
    del broken.workload.addresses[:]
    nack = s.on_response(push(resource(uid, broken, "v2")))
    assert nack.error_detail.message == f"{uid}: no IP"
    assert s.known_versions(ADDR) == {uid: "v1"}
    assert s.resources(ADDR)[uid][1] == msg


def test_handler_exception_nacks_everything_of_the_push():
    class Boom:
        def on_resources(self, type_url, added, removed):
            raise RuntimeError("bug")

    s = DeltaSession(node().to_proto(), [ADDR], Boom())
    nack = s.on_response(push(resource(*workload("a", "10.0.0.5"))))
    assert "handler failed: RuntimeError('bug')" in nack.error_detail.message
    assert s.known_versions(ADDR) == {}


def test_removal_of_known_and_unknown_names():
    s, rec = session()
    uid, msg = workload("a", "10.0.0.5")
    s.on_response(push(resource(uid, msg)))
    s.on_response(push(removed=[uid, "never-seen"]))
    assert rec.calls[-1] == (ADDR, {}, [uid])  # unknown removals are ignored
    assert s.known_versions(ADDR) == {}


def test_unsubscribed_type_is_nacked():
    s, rec = session()
    nack = s.on_response(push(type_url="type.googleapis.com/other.Type"))
    assert "was not subscribed" in nack.error_detail.message
    assert rec.calls == []


def test_node_from_env():
    env = {
        "INSTANCE_IP": "10.1.2.3",
        "POD_NAME": "ztunnel-x",
        "POD_NAMESPACE": "istio-system",
        "NODE_NAME": "worker-1",
        "ISTIO_META_CLUSTER_ID": "c1",
        "ISTIO_META_DNS_CAPTURE": "true",
        "ISTIO_METAJSON_LABELS": '{"a": "b"}',
    }
    info = NodeInfo.from_env(env)
    assert info.node_id == "ztunnel~10.1.2.3~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    md = info.to_proto().metadata
    assert md["NAME"] == "ztunnel-x"
    assert md["NAMESPACE"] == "istio-system"
    assert md["INSTANCE_IPS"] == "10.1.2.3"
    assert md["NODE_NAME"] == "worker-1"
    assert md["CLUSTER_ID"] == "c1"
    assert md["DNS_CAPTURE"] == "true"
    assert md.fields["LABELS"].struct_value.fields["a"].string_value == "b"
    assert NodeInfo.from_env({}).node_id == "ztunnel~1.1.1.1~.~.svc.cluster.local"
    with pytest.raises(ValueError, match="ISTIO_METAJSON_X is not valid JSON"):
        NodeInfo.from_env({"ISTIO_METAJSON_X": "{"})


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff()
    delays = [b.next_delay() for _ in range(14)]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]
    assert delays[-1] == 15.0
    assert max(delays) == 15.0
    b.reset()
    assert b.next_delay() == 0.01
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0)


@pytest.mark.parametrize(
    ("code", "details", "benign"),
    [
        (None, "", True),
        ("CANCELLED", "", True),
        ("UNKNOWN", "", True),
        ("DEADLINE_EXCEEDED", "", True),
        ("UNAVAILABLE", "transport is closing", True),
        ("UNAVAILABLE", "Received prior GOAWAY", True),
        ("UNAVAILABLE", "Connection refused", False),
        ("PERMISSION_DENIED", "", False),
    ],
)
def test_benign_close(code, details, benign):
    assert is_benign_close(code, details) is benign
