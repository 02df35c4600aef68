"""polcache.data"""
