import sys

from mixtral_jax.quantize.cli import main

if __name__ == "__main__":
    sys.exit(main())
