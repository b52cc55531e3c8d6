"""The time series as a service of the MTA: observer on while running, last batch written at stop."""

from __future__ import annotations

from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver, globalLogPublisher

from pymta.stats.timeseries import TimeSeries


class StatsService(service.Service):
    def __init__(self, series: TimeSeries) -> None:
        self.series = series

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        globalLogPublisher.addObserver(cast(ILogObserver, self.series.observe))
        self.series.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        globalLogPublisher.removeObserver(cast(ILogObserver, self.series.observe))
        yield self.series.stop()
        self.series.close()
