"""`python -m mixtral_jax.data prepare SOURCE... OUT --tokenizer mistral|PATH`."""

from mixtral_jax.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
