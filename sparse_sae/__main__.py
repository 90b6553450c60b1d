import sys

from sparse_sae.cli import main

sys.exit(main())
