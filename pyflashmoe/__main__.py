import sys

from pyflashmoe.cli import main

sys.exit(main())
