"""The workload view: Workload/Service/Authorization model, the indexed store, routing and L4 authorization.

Pure: no I/O. Sources (local file, xDS) feed the store; proxies ask it questions.
"""
