"""polcache.train"""
