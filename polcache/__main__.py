"""`python -m polcache`, the same as the `polcache` command."""

import sys

from polcache.cli import main

sys.exit(main())
