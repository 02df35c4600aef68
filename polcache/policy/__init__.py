"""polcache.policy"""
