"""Write a random-initialised full-size SDXL checkpoint; see make_sd15_random.py (same options, --arch sdxl)."""

from make_sd15_random import main

if __name__ == "__main__":
    main("sdxl")
