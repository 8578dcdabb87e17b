"""`python -m mixtral_jax.convert`: see `mixtral_jax.convert.cli`."""

import sys

from mixtral_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
