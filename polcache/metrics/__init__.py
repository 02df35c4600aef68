"""polcache.metrics"""
