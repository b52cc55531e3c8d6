"""Sender authentication: DKIM signing of outbound mail, SPF/DKIM/DMARC/ARC verdicts on inbound mail."""
