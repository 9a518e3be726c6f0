"""`python -m pydiff.cli ...`: the same as `pydiff ...`."""

from pydiff.cli import main

raise SystemExit(main())
