"""``python -m fleetbus.broker``."""

import sys

from fleetbus.broker.main import main

sys.exit(main())
