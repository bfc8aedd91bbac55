"""How long the demo data generator takes (run by hand: python benchmarks/bench_synthetic.py)."""
import tempfile
import time

from paddle_mm.data.synthetic import generate_split

if __name__ == "__main__":
    print(f"{'images':>8} {'seconds':>8} {'images/s':>9}")
    for n in (100, 1000):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            generate_split(d, "train", n, seed=0)
            dt = time.perf_counter() - t
        print(f"{n:>8} {dt:>8.2f} {n / dt:>9.0f}")
