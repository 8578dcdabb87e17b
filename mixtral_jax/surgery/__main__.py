"""`python -m mixtral_jax.surgery`: see `mixtral_jax.surgery.cli`."""

import sys

from mixtral_jax.surgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
