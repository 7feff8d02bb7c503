"""actors.service: the stream service that runs the contextual workflow once per event.

Routing ``ctxd:in`` into partitions (by their owners), leases and fencing, the readers,
per-workflow scheduling, run-and-commit batches, parking, heartbeats, retention, the entry
contract, and the actor system that serves the graph's work kinds over the runtime's mailboxes.
"""
