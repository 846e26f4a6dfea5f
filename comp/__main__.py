"""`python -m comp ...`"""

from comp.cli import main

raise SystemExit(main())
