"""pymta tests (package, so shared helpers import as tests.<module>)."""
