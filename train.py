"""The masked on-policy distillation loop (paper §7, Eqs. 1 and 9). Not built yet: only the CLI exists."""
import sys

import tip

if __name__ == "__main__":
    tip.build_parser(__doc__).parse_args()
    sys.exit("train.py is not built yet")
