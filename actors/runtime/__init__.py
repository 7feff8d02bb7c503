"""actors.runtime: the actor runtime, with no knowledge of workflows.

Supervisors, circuit breakers, backoff, Redis-stream mailboxes and the worker pools that serve
them, the Redis availability monitor every loop waits on, and every Lua script ctxd runs
(``scripts``: streams, leases and keys only, with one place that turns a fenced refusal
into ``graph.errors.FencedError``). It imports nothing from the
stream service or the application, and from ``graph`` only its errors.
"""
