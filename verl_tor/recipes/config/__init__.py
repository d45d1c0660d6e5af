"""hydra configs shipped with verl_tor (tor_trainer.yaml): a package, so ``pkg://verl_tor.recipes.config`` resolves."""
