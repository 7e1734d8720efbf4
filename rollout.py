"""Student rollouts (paper §3): y ~ S_θ(·|x), n per prompt, with a response mask. Not built yet."""
