"""Wire constants shared by every part of the data plane, with Istio's meanings.

Keep these in one place: ports, marks and limits must match Istio's ztunnel (see DESIGN.md section 3).
"""

from __future__ import annotations

from typing import Final

# Ports inside each pod's network namespace.
OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
INBOUND_HBONE_PORT: Final = 15008
DNS_CAPTURE_PORT: Final = 15053
SOCKS5_PORT: Final = 15080
# Ports in ztunnel's own network namespace.
ADMIN_PORT: Final = 15000
METRICS_PORT: Final = 15020
READINESS_PORT: Final = 15021

# Destination ports that are never proxied to (loops, nested HBONE).
ILLEGAL_PORTS: Final = frozenset(
    {OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT}
)

# SO_MARK on every socket ztunnel makes in a pod netns; the capture rules skip it.
INPOD_MARK: Final = 0x539
INPOD_MASK: Final = 0xFFF
# Connmark for spoofed inbound connections, routed back to ztunnel by policy routing.
TPROXY_MARK: Final = 0x111
TPROXY_ROUTE_TABLE: Final = 100
# Link-local source kubelet probes are SNATed to; exempt from capture.
PROBE_SNAT_IPV4: Final = "169.254.7.127"
PROBE_SNAT_IPV6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_SERVICE_ACCOUNT: Final = "default"
