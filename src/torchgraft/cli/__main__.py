import sys

from torchgraft.cli import main

sys.exit(main())
