"""actors.service: the stream service that runs the contextual workflow once per event.

The router and partitions of ``ctxd:in``, leases and fencing, the readers, per-workflow
scheduling, run-and-commit batches, parking, heartbeats, retention, the entry contract, and
the actor system that serves the graph's work kinds over the runtime's mailboxes.
"""
