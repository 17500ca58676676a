"""Wire compatibility of the generated code with Istio's and Envoy's published field numbers.

The descriptors below are built INDEPENDENTLY of proto/ and of the generated modules, by hand with
descriptor_pb2, from a table of the upstream field numbers (istio/ztunnel proto/, istio/api,
envoy data-plane-api). Every message is filled in every field, encoded with one side and decoded with
the other; nothing may land in unknown fields and the decoded fields must be equal, both ways. The
table is also compared field by field (number, label, type) with the generated descriptors.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    json_format,
    message_factory,
    struct_pb2,
    unknown_fields,
    wrappers_pb2,
)
from google.protobuf.descriptor import FieldDescriptor

from ztunnel.xds import protos
from ztunnel.xds.gen.workloadapi.security import authorization_pb2

W = ".istio.workload."
S = ".istio.security."
E = ".envoy.service.discovery.v3."
C = ".envoy.config.core.v3."
WKT = ".google.protobuf."

# message -> fields as "name=number:type" with suffixes: '*' repeated, '?' proto3 optional,
# '|group' oneof member. Types: scalar names, 'enum' (decoded as int32), '.pkg.Msg', 'map<k,v>'.
TABLE: dict[str, list[str]] = {
    "istio.workload.Address": [f"workload=1:{W}Workload|type", f"service=2:{W}Service|type"],
    "istio.workload.Service": [
        "name=1:string",
        "namespace=2:string",
        "hostname=3:string",
        f"addresses=4:{W}NetworkAddress*",
        f"ports=5:{W}Port*",
        "subject_alt_names=6:string*",
        f"waypoint=7:{W}GatewayAddress",
        f"load_balancing=8:{W}LoadBalancing",
        "ip_families=9:enum",
        f"extensions=10:{W}Extension*",
        "canonical=11:bool",
        "ingress_use_waypoint=12:bool",
        f"weighted_waypoints=13:{W}WeightedWaypoint*",
        "visibility=14:enum",
    ],
    "istio.workload.LoadBalancing": [
        "routing_preference=1:enum*",
        "mode=2:enum",
        "health_policy=3:enum",
    ],
    "istio.workload.Workload": [
        "uid=20:string",
        "name=1:string",
        "namespace=2:string",
        "addresses=3:bytes*",
        "hostname=21:string",
        "network=4:string",
        "tunnel_protocol=5:enum",
        "trust_domain=6:string",
        "service_account=7:string",
        f"waypoint=8:{W}GatewayAddress",
        f"network_gateway=19:{W}GatewayAddress",
        "node=9:string",
        "canonical_name=10:string",
        "canonical_revision=11:string",
        "workload_type=12:enum",
        "workload_name=13:string",
        "native_tunnel=14:bool",
        f"application_tunnel=23:{W}ApplicationTunnel",
        f"services=22:map<string,{W}PortList>",
        "authorization_policies=16:string*",
        "status=17:enum",
        "cluster_id=18:string",
        f"locality=24:{W}Locality",
        "network_mode=25:enum",
        f"extensions=26:{W}Extension*",
        f"capacity=27:{WKT}UInt32Value",
    ],
    "istio.workload.Locality": ["region=1:string", "zone=2:string", "subzone=3:string"],
    "istio.workload.PortList": [f"ports=1:{W}Port*"],
    "istio.workload.Port": ["service_port=1:uint32", "target_port=2:uint32", "app_protocol=3:enum"],
    "istio.workload.ApplicationTunnel": ["protocol=1:enum", "port=2:uint32"],
    "istio.workload.GatewayAddress": [
        f"hostname=1:{W}NamespacedHostname|destination",
        f"address=2:{W}NetworkAddress|destination",
        "hbone_mtls_port=3:uint32",
    ],
    "istio.workload.WeightedWaypoint": [f"destination=1:{W}GatewayAddress", "weight=2:uint32"],
    "istio.workload.NetworkAddress": ["network=1:string", "address=2:bytes", "length=3:uint32?"],
    "istio.workload.NamespacedHostname": ["namespace=1:string", "hostname=2:string"],
    "istio.workload.Extension": ["name=1:string", f"config=2:{WKT}Any"],
    "istio.security.Authorization": [
        "name=1:string",
        "namespace=2:string",
        "scope=3:enum",
        "action=4:enum",
        f"rules=5:{S}Rule*",
        "dry_run=6:bool",
        f"extensions=7:{W}Extension*",
    ],
    "istio.security.Rule": [f"clauses=1:{S}Clause*"],
    "istio.security.Clause": [f"matches=2:{S}Match*"],
    "istio.security.Match": [
        f"namespaces=1:{S}StringMatch*",
        f"not_namespaces=2:{S}StringMatch*",
        f"service_accounts=11:{S}ServiceAccountMatch*",
        f"not_service_accounts=12:{S}ServiceAccountMatch*",
        f"principals=3:{S}StringMatch*",
        f"not_principals=4:{S}StringMatch*",
        f"source_ips=5:{S}Address*",
        f"not_source_ips=6:{S}Address*",
        f"destination_ips=7:{S}Address*",
        f"not_destination_ips=8:{S}Address*",
        "destination_ports=9:uint32*",
        "not_destination_ports=10:uint32*",
        f"extensions=13:{W}Extension*",
    ],
    "istio.security.Address": ["address=1:bytes", "length=2:uint32"],
    "istio.security.ServiceAccountMatch": ["namespace=1:string", "serviceAccount=2:string"],
    "istio.security.StringMatch": [
        "exact=1:string|match_type",
        "prefix=2:string|match_type",
        "suffix=3:string|match_type",
        f"presence=4:{WKT}Empty|match_type",
    ],
    "envoy.config.core.v3.Locality": ["region=1:string", "zone=2:string", "sub_zone=3:string"],
    "envoy.config.core.v3.Node": [
        "id=1:string",
        "cluster=2:string",
        f"metadata=3:{WKT}Struct",
        f"locality=4:{C}Locality",
        "user_agent_name=6:string",
        "user_agent_version=7:string|user_agent_version_type",
        "client_features=10:string*",
    ],
    "envoy.service.discovery.v3.DeltaDiscoveryRequest": [
        f"node=1:{C}Node",
        "type_url=2:string",
        "resource_names_subscribe=3:string*",
        "resource_names_unsubscribe=4:string*",
        "initial_resource_versions=5:map<string,string>",
        "response_nonce=6:string",
        "error_detail=7:.google.rpc.Status",
    ],
    "envoy.service.discovery.v3.DeltaDiscoveryResponse": [
        "system_version_info=1:string",
        f"resources=2:{E}Resource*",
        "type_url=4:string",
        "removed_resources=6:string*",
        "nonce=5:string",
    ],
    "envoy.service.discovery.v3.Resource": [
        "name=3:string",
        "aliases=4:string*",
        "version=1:string",
        f"resource=2:{WKT}Any",
        f"ttl=6:{WKT}Duration",
        f"cache_control=7:{E}Resource.CacheControl",
    ],
    "envoy.service.discovery.v3.Resource.CacheControl": ["do_not_cache=1:bool"],
    "google.rpc.Status": ["code=1:int32", "message=2:string", f"details=3:{WKT}Any*"],
    "istio.v1.auth.IstioCertificateRequest": [
        "csr=1:string",
        "validity_duration=3:int64",
        f"metadata=4:{WKT}Struct",
    ],
    "istio.v1.auth.IstioCertificateResponse": ["cert_chain=1:string*"],
}

_SCALARS: dict[str, Any] = {
    "string": FieldDescriptor.TYPE_STRING,
    "bytes": FieldDescriptor.TYPE_BYTES,
    "bool": FieldDescriptor.TYPE_BOOL,
    "int32": FieldDescriptor.TYPE_INT32,
    "int64": FieldDescriptor.TYPE_INT64,
    "uint32": FieldDescriptor.TYPE_UINT32,
    "enum": FieldDescriptor.TYPE_INT32,  # enums are varints on the wire
}


def _parse_spec(spec: str) -> dict[str, Any]:
    name, rest = spec.split("=", 1)
    number, typ = rest.split(":", 1)
    typ, _, oneof = typ.partition("|")
    repeated = typ.endswith("*")
    optional = typ.endswith("?")
    typ = typ.rstrip("*?")
    return {
        "name": name,
        "number": int(number),
        "type": typ,
        "repeated": repeated,
        "optional": optional,
        "oneof": oneof or None,
    }


def _add_field(
    msg: descriptor_pb2.DescriptorProto, spec: dict[str, Any], oneofs: dict[str, int]
) -> None:
    field = msg.field.add(name=spec["name"], number=spec["number"])
    Field = descriptor_pb2.FieldDescriptorProto
    field.label = Field.LABEL_REPEATED if spec["repeated"] else Field.LABEL_OPTIONAL
    typ = spec["type"]
    if typ.startswith("map<"):
        key, value = typ[4:-1].split(",")
        entry = msg.nested_type.add(
            name="".join(p.title() for p in spec["name"].split("_")) + "Entry"
        )
        entry.options.map_entry = True
        _add_field(entry, _parse_spec(f"key=1:{key}"), {})
        _add_field(entry, _parse_spec(f"value=2:{value}"), {})
        field.label = Field.LABEL_REPEATED
        field.type = field.TYPE_MESSAGE
        field.type_name = entry.name  # resolved relative to the containing message
        return
    if typ in _SCALARS:
        field.type = _SCALARS[typ]
    else:
        field.type = field.TYPE_MESSAGE
        field.type_name = typ
    if spec["optional"]:  # proto3 `optional`: a synthetic oneof named _<field>
        oneofs[f"_{spec['name']}"] = len(msg.oneof_decl)
        msg.oneof_decl.add(name=f"_{spec['name']}")
        field.proto3_optional = True
        field.oneof_index = oneofs[f"_{spec['name']}"]
    elif spec["oneof"]:
        if spec["oneof"] not in oneofs:
            oneofs[spec["oneof"]] = len(msg.oneof_decl)
            msg.oneof_decl.add(name=spec["oneof"])
        field.oneof_index = oneofs[spec["oneof"]]


def _independent_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (any_pb2, duration_pb2, empty_pb2, struct_pb2, wrappers_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)
    by_package: dict[str, dict[str, list[str]]] = {}
    for full_name, fields in TABLE.items():
        package = ".".join(p for p in full_name.split(".") if p[:1].islower())
        by_package.setdefault(package, {})[full_name[len(package) + 1 :]] = fields
    # Files in dependency order; each depends on all WKTs and on earlier ones.
    order = [
        "google.rpc",
        "envoy.config.core.v3",
        "envoy.service.discovery.v3",
        "istio.workload",
        "istio.security",
        "istio.v1.auth",
    ]
    done: list[str] = []
    for package in order:
        fdp = descriptor_pb2.FileDescriptorProto(
            name=f"independent/{package}.proto",
            package=package,
            syntax="proto3",
            dependency=[
                f.DESCRIPTOR.name
                for f in (any_pb2, duration_pb2, empty_pb2, struct_pb2, wrappers_pb2)
            ]
            + done,
        )
        messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        for name in sorted(by_package[package], key=lambda n: n.count(".")):
            parent, _, short = name.rpartition(".")
            container = messages[parent].nested_type if parent else fdp.message_type
            messages[name] = container.add(name=short)
            oneofs: dict[str, int] = {}
            for spec in by_package[package][name]:
                _add_field(messages[name], _parse_spec(spec), oneofs)
        pool.Add(fdp)
        done.append(fdp.name)
    return pool


POOL = _independent_pool()
GENERATED = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        protos.Address,
        protos.Service,
        protos.Workload,
        protos.Authorization,
        protos.Node,
        protos.DeltaDiscoveryRequest,
        protos.DeltaDiscoveryResponse,
        protos.Resource,
        protos.Status,
        protos.IstioCertificateRequest,
        protos.IstioCertificateResponse,
        protos.Locality,
        authorization_pb2.Match,
        authorization_pb2.StringMatch,
    )
}


def generated_class(full_name: str):
    if full_name in GENERATED:
        return GENERATED[full_name]
    descriptor = protos.Address.DESCRIPTOR.file.pool.FindMessageTypeByName(full_name)
    return message_factory.GetMessageClass(cast(Any, descriptor))


def independent_class(full_name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def fill(msg, *, choice: int, depth: int = 0) -> None:
    """Set every field to a non-default value (one member per oneof: first or last by `choice`)."""
    descriptor = msg.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Any":
        msg.Pack(duration_pb2.Duration(seconds=5))
        return
    if descriptor.full_name == "google.protobuf.Duration":
        msg.seconds = 5  # JSON rendering checks the range
        return
    if descriptor.full_name == "google.protobuf.Struct":
        msg.update({"NAME": "pod", "nested": {"list": [1, "x", True]}})
        return
    chosen = {o.name: o.fields[0 if choice == 0 else -1].name for o in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen.get(oneof.name) != field.name:
            continue
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in ("k1", "k2"):
                if value_field.message_type is not None:
                    fill(value[key], choice=choice, depth=depth + 1)
                else:
                    value[key] = f"{key}-v"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for _ in range(2):
                    fill(value.add(), choice=choice, depth=depth + 1)
            else:
                sub = value
                if field.message_type.fields:
                    fill(sub, choice=choice, depth=depth + 1)
                else:
                    sub.SetInParent()  # google.protobuf.Empty
        else:
            scalar = _scalar(field)
            if field.is_repeated:
                value.extend([scalar, scalar])
            else:
                setattr(msg, field.name, scalar)


def _scalar(field):
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{field.number}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes([10, 0, 0, field.number])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_INT64:
        return 2**40 + field.number
    return 100 + field.number


def as_dict(msg) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, use_integers_for_enums=True
    )


def no_unknown_fields(msg) -> None:
    """Recursively: every byte decoded into a known field."""
    assert len(unknown_fields.UnknownFieldSet(msg)) == 0, msg.DESCRIPTOR.full_name
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            values = (
                value.values() if field.message_type.fields_by_name["value"].message_type else []
            )
        elif field.is_repeated:
            values = value
        else:
            values = [value]
        for sub in values:
            no_unknown_fields(sub)


MESSAGES = sorted(TABLE)


@pytest.mark.parametrize("full_name", MESSAGES, ids=MESSAGES)
def test_generated_descriptor_matches_table(full_name):
    generated = generated_class(full_name).DESCRIPTOR
    table = {s["name"]: s for s in map(_parse_spec, TABLE[full_name])}
    assert set(generated.fields_by_name) == set(table), "fields differ from the upstream table"
    for name, spec in table.items():
        field = generated.fields_by_name[name]
        assert field.number == spec["number"], name
        assert (field.is_repeated) == (spec["repeated"] or spec["type"].startswith("map<")), name
        if spec["type"] == "enum":
            assert field.type == FieldDescriptor.TYPE_ENUM, name
        elif spec["type"] in _SCALARS:
            assert field.type == _SCALARS[spec["type"]], name
        elif not spec["type"].startswith("map<"):
            assert "." + field.message_type.full_name == spec["type"], name
        assert (field.containing_oneof is not None) == bool(spec["oneof"] or spec["optional"]), name


@pytest.mark.parametrize("choice", [0, -1], ids=["first-oneof-member", "last-oneof-member"])
@pytest.mark.parametrize("full_name", MESSAGES, ids=MESSAGES)
def test_generated_to_independent_and_back(full_name, choice):
    ours = generated_class(full_name)()
    fill(ours, choice=choice)
    theirs = independent_class(full_name).FromString(ours.SerializeToString())
    no_unknown_fields(theirs)
    assert as_dict(theirs) == as_dict(ours)

    # Reverse: encoded by the independent descriptors, decoded by the generated code.
    back = generated_class(full_name).FromString(theirs.SerializeToString())
    no_unknown_fields(back)
    assert as_dict(back) == as_dict(theirs)


def test_independent_message_decodes_in_generated_code():
    theirs = independent_class("istio.workload.Address")()
    json_format.ParseDict(
        {
            "workload": {
                "uid": "c/g/Pod/ns/a",
                "addresses": ["CgAAAQ=="],
                "tunnel_protocol": 1,
                "services": {
                    "ns/svc.ns.svc.cluster.local": {
                        "ports": [{"service_port": 80, "target_port": 8080}]
                    }
                },
                "capacity": 3,
            }
        },
        theirs,
    )
    ours = protos.Address.FromString(theirs.SerializeToString())
    assert ours.workload.uid == "c/g/Pod/ns/a"
    assert ours.workload.addresses == [bytes([10, 0, 0, 1])]
    assert ours.workload.tunnel_protocol == 1  # HBONE
    assert ours.workload.services["ns/svc.ns.svc.cluster.local"].ports[0].target_port == 8080
    assert ours.workload.capacity.value == 3


def test_type_urls_and_methods():
    assert protos.type_url_of(protos.Address()) == "type.googleapis.com/istio.workload.Address"
    assert (
        protos.type_url_of(protos.Authorization())
        == "type.googleapis.com/istio.security.Authorization"
    )
    assert protos.DELTA_ADS_METHOD == (
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
    )
    assert (
        protos.CREATE_CERTIFICATE_METHOD
        == "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    )


def test_missing_generated_code_says_what_to_run():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ztunnel.xds.gen'] = None\n"
        "try:\n    import ztunnel.xds.protos\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "scripts/gen-protos" in out.stdout
