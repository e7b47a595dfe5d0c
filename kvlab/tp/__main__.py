"""`python -m kvlab.tp` / `torchrun -m kvlab.tp`: the `kvlab tp` command."""
import sys

from kvlab.cli.tp import main

sys.exit(main())
