"""What the AMM knows and keeps: the SQLite state and the books over it (goals, lost keys,
tombstones, keys being stored), cycle records and directive outcomes. No agent I/O."""
