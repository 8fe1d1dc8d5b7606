"""`python -m fedspa_jax ...` is the `fedspa-jax` command line (see fedspa_jax.cli)."""

import sys

from fedspa_jax.cli import main

sys.exit(main())
