r"""
Fusion: how the weighted teachers form one target distribution $\bar p$ at a position.

* `probability`: $\bar p = \sum_k w_k p_k$, the mixture of the teachers' tempered distributions;
* `logit`: $\bar p = \mathrm{softmax}(\sum_k w_k z_k / \tau)$, the weighted geometric mean, renormalised.
"""

FUSIONS = ("probability", "logit")
