import sys

from mdm_server.cli import main

sys.exit(main())
