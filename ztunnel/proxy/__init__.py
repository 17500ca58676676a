"""asyncio shells that move bytes: HBONE server and pooled client, outbound/inbound listeners, copy."""
