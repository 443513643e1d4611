"""AdaVAE (seed 001): a VAE language model on one frozen causal LM with parameter-efficient components."""
