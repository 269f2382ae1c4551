"""What operators and watchers read: queries and fresh key lookups, the dashboard's history and
its sampling, and the event feed that ``WatchEvents`` follows."""
