"""`python -m sdlora ...`: see sdlora.cli."""

from sdlora import runtime

runtime.prepare()  # before anything imports torch: OpenMP reads its settings once, when it starts

from sdlora.cli import main  # noqa: E402

raise SystemExit(main())
