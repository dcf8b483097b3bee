"""`python -m telepathy.resume`: job scripts call this; it is `telepathy resume`
(telepathy.train.resume). Kept at this path so that scripts written against it keep working."""

import sys

from .train.resume import main

if __name__ == "__main__":
    sys.exit(main())
