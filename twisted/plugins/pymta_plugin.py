"""twistd plugin: ``twistd pymta`` builds the service tree in :mod:`pymta.tap`."""

from twisted.application.service import ServiceMaker

pymta = ServiceMaker("pymta", "pymta.tap", "pymta mail transfer agent (MX, relay, feedback loop)", "pymta")
