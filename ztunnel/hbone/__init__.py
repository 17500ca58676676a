"""HBONE: sans-IO HTTP/2 CONNECT client and server over h2, authority parsing and the H2 guard limits.

Nothing in this package does I/O: it takes bytes and events in and gives bytes and events out.
"""
