"""pymta: a durable Mail Transfer Agent on Twisted."""
