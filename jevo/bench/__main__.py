import sys

from jevo.bench.cli import main

sys.exit(main())
