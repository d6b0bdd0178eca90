"""Names the claims and the report share."""

DEPTH_ARTIFACT = "diagnostics/token_depth.csv"
DEEP = "vanilla-deep"  # vanilla with more layers than its ladder size: the larger vanilla
OTHERS = ["vanilla", DEEP, "looped", "pause", "ponder", "fixed", "mor"]
GRAD_KEYS = ["router_ratio", "router_cosine", "backbone_ratio", "backbone_cosine"]
