"""python -m benchmarks: see benchmarks/run.py and benchmarks/README.md."""
from .run import main

if __name__ == "__main__":
    main()
