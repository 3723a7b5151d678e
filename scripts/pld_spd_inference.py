"""Seed-compatible pld speculative decoding script (flags of QEfficient's example).

    python scripts/pld_spd_inference.py --prompts "def fib(n):" --num-speculative-tokens 4 --ctx-len 256
"""

from spd_cluster.seed_scripts import main

if __name__ == "__main__":
    main("pld")
