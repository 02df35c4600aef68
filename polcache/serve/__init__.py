"""polcache.serve"""
