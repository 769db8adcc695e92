"""``python -m prefork_proxy`` is the ``prefork-proxy`` command."""

import sys

from prefork_proxy.cli import main

sys.exit(main())
