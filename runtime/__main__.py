"""`python -m runtime ...`: the runtime half of the attnx CLI, without torch."""

from ._cli import main

raise SystemExit(main())
