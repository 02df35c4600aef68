"""polcache.client"""
