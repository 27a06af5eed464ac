import sys

from sparsecc.cli import main

sys.exit(main())
