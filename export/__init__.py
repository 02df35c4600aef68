"""Exported denoisers (imported as polcache.export)."""
