import sys

from jevo.plan.cli import main

sys.exit(main())
