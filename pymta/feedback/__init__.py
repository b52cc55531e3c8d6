"""The feedback loop: return paths, parsing bounces and complaints, suppression."""
