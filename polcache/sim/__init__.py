"""polcache.sim"""
