import sys

from fellrec.cli import main

sys.exit(main())
