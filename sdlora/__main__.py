"""`python -m sdlora ...`: see sdlora.cli."""

from sdlora.cli import main

raise SystemExit(main())
