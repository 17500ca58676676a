"""Kubernetes mode of ztunnel: this node's pods and namespaces, their netns, and the process wiring.

``pods`` decides which pods of the node are in the mesh (pure), ``netns`` finds a pod's network
namespace, ``watch`` keeps the pod and namespace caches current with kubernetes_asyncio, and
``mode`` builds the xDS source, the Istio CA client and the local-pods provider from the
environment the DaemonSet sets.
"""
