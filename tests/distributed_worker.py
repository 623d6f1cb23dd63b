"""One rank of the test's torchrun launch: train a recipe through the public API, dump the result.

Usage (under torchrun): distributed_worker.py RECIPE.yaml BASE_DIR [--resume]. Rank R works in
BASE_DIR/rank<R> (as on separate machines: no shared output folder), so a relative ``output_dir``
shows which ranks wrote files, and dumps its final weights, masks, library and metrics to
BASE_DIR/state-rank<R>.pt for the test to compare across ranks.

With ``DIVERGE_RANK=R`` in the environment, rank R nudges PruneTrain's lasso coefficient by one
ulp after fixing it: weights stay identical (DDP averages the gradients), so only the cross-rank
check of the method's state can notice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml

from clicktrain_deploy import parse_recipe, train


def main() -> None:
    recipe_file, base = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    folder = base / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    recipe = parse_recipe(yaml.safe_load(recipe_file.read_text()), str(recipe_file))
    if os.environ.get("DIVERGE_RANK") == str(rank):
        import math

        from clicktrain_deploy.pruning.prunetrain import PruneTrain

        fix = PruneTrain.penalty_term

        def diverged(self, loss, phase):
            fixed = self.coefficient is not None
            term = fix(self, loss, phase)
            if not fixed:
                self.coefficient = math.nextafter(self.coefficient, math.inf)
            return term

        PruneTrain.penalty_term = diverged
    result = train(recipe, resume="--resume" in sys.argv, progress=False)
    torch.save({"model": result.model.state_dict(), "pruner": result.pruner.state_dict(),
                "metrics": result.metrics}, base / f"state-rank{rank}.pt")


if __name__ == "__main__":
    main()
