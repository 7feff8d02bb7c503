"""actors.runtime: the actor runtime, with no knowledge of workflows.

Supervisors, circuit breakers, backoff, Redis-stream mailboxes and the worker pools that serve
them, and the Redis availability monitor every loop waits on. It imports nothing from the
stream service or the application, and from ``graph`` only its errors.
"""
