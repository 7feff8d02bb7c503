"""actors/: who does the work and keeps it alive.

The ingress consumer, stream operations with their delivery guarantees, actor
mailboxes and worker pools, supervisors, circuit breakers, the embedded Redis,
configuration, the daemon and the command line.
"""

from __future__ import annotations

from actors.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStatistics,
    BreakerTransition,
    CallNotPermittedError,
    CircuitBreaker,
)
from actors.config import Settings, load_settings
from actors.dispatch import ActorDispatch
from actors.mailbox import ActorError, ActorReply, ActorRequest, Mailbox
from actors.pool import ActorPool
from actors.supervisor import (
    ChildSpec,
    RestartEvent,
    Supervisor,
    SupervisorConfig,
    SupervisorEscalation,
)
from actors.tree import ActorSystem
from actors.validation import Event, parse_event

__all__ = [
    "ActorDispatch",
    "ActorError",
    "ActorPool",
    "ActorReply",
    "ActorRequest",
    "ActorSystem",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "CallNotPermittedError",
    "ChildSpec",
    "CircuitBreaker",
    "Event",
    "Mailbox",
    "RestartEvent",
    "Settings",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorEscalation",
    "load_settings",
    "parse_event",
]
