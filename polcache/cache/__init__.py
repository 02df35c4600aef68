"""polcache.cache"""
