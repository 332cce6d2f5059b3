from __future__ import annotations

import sys

from relay import cli

sys.exit(cli.main())
