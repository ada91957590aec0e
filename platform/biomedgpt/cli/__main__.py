"""`python -m biomedgpt.cli ...`: the `biomedgpt` command."""

import sys

from . import main

sys.exit(main())
