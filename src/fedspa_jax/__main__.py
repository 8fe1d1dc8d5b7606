import sys

from fedspa_jax.cli import main

sys.exit(main())
