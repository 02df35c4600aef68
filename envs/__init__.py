"""Simulation tasks (imported as polcache.envs)."""
