"""Per-minute time series of mail flow (for the dashboard) and delivery reports."""
