"""escarda_lab: architecture ablations of the Escarda-86M decoder LM."""

import time as _time

__version__ = "0.1.0"
STARTED = _time.perf_counter()  # when the package was first imported: a run's start-up is counted from here
