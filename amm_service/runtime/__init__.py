"""The AMM's moving parts: the loop, the poller, the dispatcher, the ledger, the state store."""
