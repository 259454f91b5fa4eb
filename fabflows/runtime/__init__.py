"""The runtime every runbook runs in: engine, journal, recovery (guard, lock, approval, audit
stay importable as fabflows.guard, fabflows.lock, fabflows.approval, fabflows.audit)."""
