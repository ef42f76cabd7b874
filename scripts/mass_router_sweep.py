"""Router layer sweep: routing and task-unknown accuracy of a MASS artifact with the router at every block.

Runs on the zoo's validation split, so the default block can be chosen without
touching the test split. The normalized accuracy divides by each task's fine-tuned
test accuracy (the zoo stores no fine-tuned validation accuracy), so it is an estimate.

Usage: python scripts/mass_router_sweep.py ARTIFACT [--zoo-dir DIR] [--split validation]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergekit_ext.mass.evaluation import router_layer_sweep
from mergekit_ext.mass.runtime import MassModel
from mergekit_ext.zoo.text import default_zoo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--zoo-dir", type=Path, default=None, help="zoo folder [default: the cached full text zoo]")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--mode", default="topk", choices=["topk", "top1"])
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()

    model = MassModel.from_pretrained(arguments.artifact, device=arguments.device, mode=arguments.mode, cache_capacity=64)
    points = router_layer_sweep(model, arguments.zoo_dir or default_zoo_dir(), split=arguments.split)
    print(f"{'layer':>5} {'routing top-1':>13} {'coverage':>9} {'set size':>9} {'accuracy':>9} {'normalized':>10}")
    for point in points:
        print(
            f"{point.layer:>5} {point.top1_accuracy:>13.3f} {point.coverage:>9.3f} {point.mean_set_size:>9.2f} "
            f"{point.accuracy:>9.3f} {point.normalized_accuracy:>10.3f}"
        )


if __name__ == "__main__":
    main()
