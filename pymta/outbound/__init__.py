"""Outbound: routes, delivery over SMTP, bounces we generate."""
