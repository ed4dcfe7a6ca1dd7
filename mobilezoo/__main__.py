"""`python -m mobilezoo ...`: the `mobilezoo` command without the console script."""
from .cli import main

raise SystemExit(main())
