"""``python -m visioncare.data.synthetic ROOT``: build (or reuse) a synthetic set from the shell.

`python -m` on a package runs this file; the generator modules stay free of argument parsing.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from visioncare.data.synthetic import DIFFICULTY_PRESETS, generate_synthetic_idrid


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m visioncare.data.synthetic ROOT`` builds the dataset and reports time."""
    parser = argparse.ArgumentParser(
        prog="python -m visioncare.data.synthetic", description=main.__doc__
    )
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=413)
    parser.add_argument("--num-test", type=int, default=103)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTY_PRESETS), default="standard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    root = generate_synthetic_idrid(
        args.root,
        args.num_train,
        args.num_test,
        args.image_size,
        args.seed,
        args.num_workers,
        DIFFICULTY_PRESETS[args.difficulty],
    )
    print(f"{root} ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
