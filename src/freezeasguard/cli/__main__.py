"""`python -m freezeasguard.cli ...` (as `accelerate launch -m freezeasguard.cli` runs it)."""
import sys

from freezeasguard.cli.main import main

sys.exit(main())
