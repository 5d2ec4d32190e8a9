import sys

from cpt.shared.cli import main

sys.exit(main())
