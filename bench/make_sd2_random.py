"""Write a random-initialised full-size SD2 checkpoint; see make_sd15_random.py (same options, --arch sd2)."""

from make_sd15_random import main

if __name__ == "__main__":
    main("sd2")
