"""Low-rank factorisation for the `lowrank` pass: the math (`factorize`), the layers and the graph
rewrite (`layers`), and the per-layer choice of method and rank (`plan`)."""
