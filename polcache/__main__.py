"""`python -m polcache`, the same as the `polcache` command."""

from polcache.cli import console

console()
