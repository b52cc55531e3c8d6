"""The HTTP service: injection and admin API, Prometheus metrics (admin listener), one-click
unsubscribe (public listener). ``service.build_http`` wires it; the rest is one module a job."""
