"""Every op of the T1 training step in each candidate formulation (see mindformers_sigma/benchmarks/kernels.py).

Usage: python bench/kernels.py [--out bench/results/kernels_t1.json] [--seconds 0.3] [--only SUBSTRING]
       python bench/kernels.py --table bench/results/kernels_t1.json   (the docs table)
"""

from mindformers_sigma.benchmarks.kernels import main

if __name__ == "__main__":
    main()
