"""The SMTP wire protocol, ours: server and client state machines, reply codes."""
