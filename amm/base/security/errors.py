"""The one exception of the security layer.

Everything that can go wrong before a single RPC (a missing or malformed certificate, a CA that
would be overwritten, a name that cannot be an identity, an open address without TLS) raises
``SecurityError`` with a message meant for the person at the terminal, so that the CLI prints
``error: <message>`` and exits 1 instead of showing a traceback.
"""

from __future__ import annotations


class SecurityError(Exception):
    """Security material is missing, invalid or would be unsafe to use; the message says which."""
