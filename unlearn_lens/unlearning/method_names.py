"""The unlearning methods by name: what kind each is and one line saying what it does.

Its own module so that ``config`` (a run's settings) and ``presets`` (published settings per
method) both read it without importing each other.
"""

#: method -> (kind, one-line description). Kind: "loss" (logits), "representation" (hidden
#: states), "weight" (weight space; not compatible with LoRA).
METHODS: dict[str, tuple[str, str]] = {
    "ga_simple": ("loss", "gradient ascent on forget NLL"),
    "ga": ("loss", "ascent on forget NLL + descent on retain NLL"),
    "grad_diff": ("loss", "retain NLL - forget_weight * forget NLL"),
    "dpo": ("loss", "DPO: a refusal preferred over the forget continuation (frozen reference) + retain NLL"),
    "npo": ("loss", "NPO on summed sequence log-probs (frozen reference) + retain NLL"),
    "simnpo": ("loss", "SimNPO on length-normalised log-probs (reference-free) + retain NLL"),
    "rmu": ("representation", "RMU: forget activations -> random target (MSE), retain anchored"),
    "cb": ("representation", "circuit breakers: cosine rerouting (original) or RR loss (--cb-variant rr)"),
    "lat": ("representation", "latent adversarial training: adversary on the residual stream, then ascent/descent "
                              "(original) or targeted LAT's away + retain losses"),
    "cb_lat": ("representation", "circuit breakers under an adversary placed upstream of the scored layers "
                                 "(deep ignorance's rr-lat with --cb-variant rr)"),
    "wt_dist": ("weight", "Gaussian noise on all weights, then retain fine-tuning"),
    "wt_dist_reg": ("weight", "retain NLL - lambda * RMS distance from the pretrained weights"),
}


#: Methods whose loss weighs its forget term by ``--forget-weight`` (cb and cb_lat only under
#: ``--cb-variant rr``); every other method's loss has no such weight.
FORGET_WEIGHTED = ("grad_diff", "dpo", "npo", "simnpo")
FORGET_WEIGHTED_RR = ("cb", "cb_lat")


def reads_forget_weight(method: str, cb_variant: str) -> bool:
    """Whether ``method``'s loss uses ``--forget-weight`` (so that a flag it ignores is refused)."""
    return method in FORGET_WEIGHTED or (method in FORGET_WEIGHTED_RR and cb_variant == "rr")
