"""Inbound: what the SMTP server decides and where accepted recipients go."""
