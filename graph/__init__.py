"""graph/: what the contextual workflow decides.

State schema, context features, the seed's routing engine and quality score, the five
nodes and their research workers, the compiled workflow and the checkpointer factory.
"""

from __future__ import annotations

from graph.errors import (
    ConfigError,
    CtxdError,
    InvalidEntryError,
    RedisModulesMissingError,
    WorkflowError,
)
from graph.quality import quality_score
from graph.routing import (
    RoutingConfig,
    RoutingContext,
    RoutingDecision,
    RoutingEngine,
    RoutingOutcome,
)

__all__ = [
    "ConfigError",
    "CtxdError",
    "InvalidEntryError",
    "RedisModulesMissingError",
    "RoutingConfig",
    "RoutingContext",
    "RoutingDecision",
    "RoutingEngine",
    "RoutingOutcome",
    "WorkflowError",
    "quality_score",
]
