"""actors/: who does the work and keeps it alive.

The ingress consumer, stream operations with their delivery guarantees, actor
mailboxes and worker pools, supervisors, circuit breakers, the embedded Redis,
configuration, the daemon and the command line.
"""

from __future__ import annotations

from actors.config import Settings, load_settings
from actors.runtime.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStatistics,
    BreakerTransition,
    CallNotPermittedError,
    CircuitBreaker,
)
from actors.runtime.mailbox import ActorError, ActorReply, ActorRequest, Mailbox
from actors.runtime.pool import ActorPool
from actors.runtime.supervisor import (
    ChildSpec,
    RestartEvent,
    Supervisor,
    SupervisorConfig,
    SupervisorEscalation,
)
from actors.service.dispatch import ActorDispatch
from actors.service.tree import ActorSystem
from actors.service.validation import Event, parse_event

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
