"""`python -m slimtune ...` (also what `torchrun -m slimtune train ...` runs)."""

from slimtune.cli import main

raise SystemExit(main())
