import sys
from rksmolvlm.cli import main

sys.exit(main())
