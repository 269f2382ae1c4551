"""Domain errors of the agent's user-facing calls (Put, Get, Pin, Unpin, Delete, Fetch).

They are plain exceptions with no gRPC in sight; ``servicer`` maps each class to one status code in
one place. Directive outcomes are not errors: they are values (``directives.Outcome``).
"""

from __future__ import annotations

from worker_agent.integrity import Reason


class AgentError(Exception):
    """Base class; ``message`` is what the caller reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownKey(AgentError):
    """The key is not held here (and could not be fetched, when fetching was allowed)."""


class InvalidRequest(AgentError):
    """The request is malformed: bad key, stream out of order, size or checksum not as declared."""


class ContentConflict(AgentError):
    """Different content is already stored under the key; keys are immutable."""


class TooLarge(AgentError):
    """The value exceeds the largest value accepted or the worker's memory limit."""


class Refused(AgentError):
    """The agent refuses to protect data or a local reader (pinned, in use, promised, ...)."""

    def __init__(self, reason: Reason | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(AgentError):
    """No holder of the key could be reached."""


class DataLoss(AgentError):
    """A holder sent data that does not match its size or checksum."""
