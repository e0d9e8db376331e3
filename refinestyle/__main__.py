import sys

from refinestyle.cli import main

sys.exit(main())
