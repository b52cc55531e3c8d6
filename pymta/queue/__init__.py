"""The durable queue: the store (what), the scheduler (when), the manager (who moves work)."""
