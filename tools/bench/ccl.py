"""Communicator repair benchmark: full init vs rebuild vs shrink vs grow.

python tools/bench/ccl.py --backend gloo --world 4 --json OUT
python tools/bench/ccl.py --backend nccl --world 4 --json OUT   # one GPU per rank

The last printed line is ``repair_speedup: <x>`` (warm full init / (shrink + grow)).
The implementation lives in mnemosyne.ccl.bench (also ``mnemo ccl bench``).
"""

import sys

from mnemosyne.ccl.bench import main

if __name__ == "__main__":
    sys.exit(main())
