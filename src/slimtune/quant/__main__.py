import sys

from slimtune.quant.demo import main

sys.exit(main())
